"""MTP speculative decoding on the model: greedy output token-identical to K = 0 (torch path and the Triton
decode kernel under the interpreter), drafts that are right are all accepted, the MTP's cache stays what a
from-scratch pass computes through verification and rollback, and every page comes back."""

import pytest
import torch

from helpers.runner import mtp_logits
from helpers.spec_loop import spec_generate
from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.engine.sampler import SamplingParams
from moe_pd.engine.spec.mtp_step import Drafts, MTPSpeculator
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.loader import build_model

PROMPTS = [[256, *b"Hello, moe_pd"], [256, *b"ab"], [256, *range(40, 59)]]
NEW = 12


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, mtp=True)


@pytest.fixture(scope="module")
def reference(model):
    """K = 0 greedy continuations (NEW + 3 tokens, so forced drafts can look ahead)."""
    engine = OfflineEngine(model, KVCacheConfig(block_size=4, num_blocks=128), max_batch_size=8)
    return [c.output_ids for c in engine.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW + 3, ignore_eos=True))]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculation_is_token_identical_to_plain_decoding(model, reference, k):
    run = spec_generate(model, PROMPTS, k, NEW)
    assert run.outputs == [r[:NEW] for r in reference]
    assert run.pages_free_at_end == run.num_blocks  # every page back after the rollbacks and frees


def test_right_drafts_are_all_accepted_and_the_mtp_cache_stays_exact(model, reference):
    """Drafts forced to the true continuation are all accepted (K + 1 tokens a step); forced wrong at position 2
    only the first is. After every step the first new draft is the argmax of the MTP module run from scratch
    over the whole sequence: verification, the MTP extend and the rollback keep its cache rows exact."""
    k = 3
    full = [p + r for p, r in zip(PROMPTS, reference)]
    run = spec_generate(model, PROMPTS, k, NEW, force_drafts=lambda i, n: full[i][n : n + k])
    assert run.outputs == [r[:NEW] for r in reference]
    assert all(a == k for step in run.accepted[:-1] for a in step)
    lengths = [len(p) + 1 for p in PROMPTS]
    for accepted, firsts in zip(run.accepted[:2], run.first_drafts[:2]):
        lengths = [n + a + 1 for n, a in zip(lengths, accepted)]
        for i, first in enumerate(firsts):
            assert first == int(mtp_logits(model, full[i][: lengths[i]])[-1].argmax()), (i, lengths[i])

    def wrong_second(i, n):
        drafts = full[i][n : n + k]
        return [drafts[0], (drafts[1] + 1) % 256, drafts[2]]

    run = spec_generate(model, PROMPTS, k, NEW, force_drafts=wrong_second)
    assert run.outputs == [r[:NEW] for r in reference]
    assert all(a == 1 for step in run.accepted for a in step)


def test_sampled_speculation_is_reproducible_and_in_vocabulary(model):
    params = SamplingParams(temperature=0.8, top_p=0.9)
    a = spec_generate(model, PROMPTS, 2, NEW, params, seed=5)
    b = spec_generate(model, PROMPTS, 2, NEW, params, seed=5)
    assert a.outputs == b.outputs and all(len(o) == NEW for o in a.outputs)
    assert all(0 <= t < TINY.vocab_size for o in a.outputs for t in o)


def test_verification_through_the_decode_kernel_equals_the_torch_path(model):
    """One verification step (3 queries per sequence) through the Triton kernel (interpreted) gives the torch
    path's logits; K = 2 greedy generation through the kernels is token-identical to plain decoding."""
    from moe_pd.model.ops import TORCH_OPS, select_ops

    triton_ops = select_ops("triton", torch.device("cpu"))
    cfg = model.cfg
    cache = PagedLatentCache(model.num_cache_layers, 16, 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    tables, ids = [[3, 1, 7, 9], [2, 5]], [[256, *b"kernel"], [256, 7]]
    with torch.inference_mode():
        prefill = AttentionBatch.build(tables, [0, 0], [len(i) for i in ids], 4)
        model(torch.tensor(ids[0] + ids[1]), prefill, cache)
        verify = AttentionBatch.build(tables, [len(i) for i in ids], [3, 3], 4, verify=True)
        step_ids = torch.tensor([11, 12, 13, 21, 22, 23])
        logits = []
        for ops in (TORCH_OPS, triton_ops):
            model.use_ops(ops)
            logits.append(model.logits(model(step_ids, verify, cache)))
    model.use_ops(None)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    model.use_ops(triton_ops)
    try:
        run = spec_generate(model, PROMPTS[:2], 2, 4)
    finally:
        model.use_ops(None)
    engine = OfflineEngine(model, KVCacheConfig(block_size=4, num_blocks=64), max_batch_size=8)
    assert run.outputs == [c.output_ids for c in engine.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4,
                                                                                              ignore_eos=True))]


def test_a_step_needs_room_and_an_mtp_layer(model):
    cfg = model.cfg
    cache = PagedLatentCache(model.num_cache_layers, 8, 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    spec = MTPSpeculator(model, cache, 2)
    greedy = [SamplingParams()]
    with pytest.raises(ValueError, match=r"cover position L \+ 2"):
        spec.step([[0, 1]], [6], [5], Drafts(torch.tensor([[1, 2]]), None), greedy, [None])
    with pytest.raises(ValueError, match="without its MTP layer"):
        MTPSpeculator(build_model(TINY), cache, 2)
    with pytest.raises(ValueError, match="cache has 3 layers"):
        MTPSpeculator(model, PagedLatentCache(3, 8, 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim), 2)


def test_an_idle_rank_runs_the_same_forwards_with_no_sequences(model):
    """EP ranks pair their all-to-alls: a rank without sequences runs as many forwards of every layer."""
    cfg = model.cfg
    cache = PagedLatentCache(model.num_cache_layers, 8, 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    spec = MTPSpeculator(model, cache, 3)
    calls = []
    hook = model.mtp[0].block.mlp.gate.register_forward_hook(lambda *_: calls.append("mtp"))
    hook2 = model.model.layers[-1].mlp.gate.register_forward_hook(lambda *_: calls.append("main"))
    try:
        with torch.inference_mode():
            none = torch.zeros(0, 3, dtype=torch.int64)
            verdict, drafts = spec.step([], [], [], Drafts(none, None), [], [])
            idle = list(calls)
            calls.clear()
            spec.step([[0, 1, 2, 3]], [6], [5], Drafts(torch.tensor([[1, 2, 3]]), None), [SamplingParams()], [None])
    finally:
        hook.remove()
        hook2.remove()
    assert verdict.tokens == [] and drafts.tokens_BK.shape == (0, 3)
    assert idle == calls == ["main", "mtp", "mtp", "mtp"]  # verify, extend, two chain rows
