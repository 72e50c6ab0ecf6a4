"""Continuous batching over the paged cache: batching never changes a request's tokens."""

import pytest

from helpers.runner import greedy_reforward
from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine, PromptError
from moe_pd.model.loader import build_model

PROMPTS = [[256, *b"Hello"], [256, *b"A longer prompt here"], [256, 1], [256, *b"abc" * 7]]


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


def engine(model, batch=8, blocks=256, block_size=4):
    return OfflineEngine(model, KVCacheConfig(block_size=block_size, num_blocks=blocks), batch)


def test_batch_size_and_page_pressure_do_not_change_outputs(model):
    sampling = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    ref = [c.output_ids for c in engine(model).generate(PROMPTS, sampling)]
    assert ref[0] == greedy_reforward(model, PROMPTS[0], 12)
    for batch, blocks in [(1, 256), (2, 256), (8, 14)]:  # 14 pages: only some prompts fit at a time
        e = engine(model, batch, blocks)
        assert [c.output_ids for c in e.generate(PROMPTS, sampling)] == ref
        assert e.allocator.num_used == 0  # every page returned (cached pages are free to take)


def test_sampled_outputs_reproducible_and_batch_independent(model):
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=11, ignore_eos=True)
    a = [c.output_ids for c in engine(model, batch=4).generate(PROMPTS, sampling)]
    b = [c.output_ids for c in engine(model, batch=1).generate(PROMPTS, sampling)]
    assert a == b
    other = SamplingConfig(**{**sampling.__dict__, "seed": 12})
    assert [c.output_ids for c in engine(model).generate(PROMPTS, other)] != a


def test_stops_on_eos(model):
    ref = engine(model).generate(PROMPTS[:1], SamplingConfig(max_new_tokens=8, ignore_eos=True))[0].output_ids
    e = engine(model)
    e.eos = ref[2]  # pretend the third generated token is EOS
    out = e.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=8))[0]
    assert out.output_ids == ref[: ref.index(ref[2]) + 1] and out.finish_reason == "stop"


def test_generation_stops_at_the_context_end(model):
    prompt = [256] + [65] * (TINY.max_position_embeddings - 3)
    out = engine(model, blocks=300).generate([prompt], SamplingConfig(max_new_tokens=10, ignore_eos=True))[0]
    assert len(out.output_ids) == 2 and out.finish_reason == "length"


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[]], "prompt 0 is empty"),
        ([[1], [5] * 5000], "prompt 1 has 5000 tokens and does not fit the context of 1024"),
        ([[1, 999]], r"outside \[0, 320\)"),
    ],
)
def test_bad_prompts(model, prompts, message):
    with pytest.raises(PromptError, match=message):
        engine(model).generate(prompts, SamplingConfig())


def test_pool_too_small_for_one_prompt(model):
    with pytest.raises(PromptError, match="kvcache.num_blocks=2"):
        engine(model, blocks=2).generate([[1] * 30], SamplingConfig(max_new_tokens=4))


def test_chunked_prefill_prefix_cache_and_preemption_keep_tokens(model):
    """The scheduler's choices (chunk sizes, cache hits, recompute after preemption) never change tokens."""
    shared = [256, *b"You are a helpful assistant. "]
    prompts = [shared + list(b"Hi"), shared + list(b"Hello there"), [256, *b"x" * 40], shared + list(b"Hi!")]
    sampling = SamplingConfig(max_new_tokens=10, ignore_eos=True)
    ref = [c.output_ids for c in engine(model, batch=1).generate(prompts, sampling)]
    tight = OfflineEngine(model, KVCacheConfig(block_size=4, num_blocks=24, host_tier_gib=0), max_batch_size=4,
                          max_num_batched_tokens=7)  # no tiers: nothing cached elsewhere spares a preemption
    out = tight.generate(prompts, sampling)
    assert [c.output_ids for c in out] == ref
    assert sum(c.preemptions for c in out) > 0  # 24 pages cannot hold all four at once
    assert tight.allocator.num_used == 0
    cached = OfflineEngine(model, KVCacheConfig(block_size=4, num_blocks=256), max_batch_size=1)
    out = cached.generate(prompts, sampling)
    assert [c.output_ids for c in out] == ref
    assert out[1].cached_tokens >= 28 and out[3].cached_tokens >= 28  # the shared system prompt
