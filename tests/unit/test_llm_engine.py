"""LLMEngine: requests added and aborted between steps, streamed token by token, pages always returned."""

import pytest

from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.core.request import SamplingParams
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.engine.offline import OfflineEngine
from moe_pd.model.loader import build_model


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


def make(model, **kw):
    return LLMEngine(model, KVCacheConfig(block_size=4, num_blocks=kw.pop("blocks", 128)), 8, 64, **kw)


def drain(engine):
    streams: dict[str, list[int]] = {}
    reasons = {}
    while engine.has_work:
        _, outputs = engine.step()
        for out in outputs:
            streams.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert len(out.new_token_ids) <= 1  # streamed one token per step
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return streams, reasons


def test_streams_match_offline_generation(model):
    prompts = [[256, *b"streaming"], [256, *b"hello"]]
    ref = OfflineEngine(model, KVCacheConfig(block_size=4, num_blocks=128), 8).generate(
        prompts, SamplingConfig(max_new_tokens=6, ignore_eos=True))
    engine = make(model)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, 6, ignore_eos=True)
    streams, reasons = drain(engine)
    assert [streams[str(i)] for i in range(2)] == [c.output_ids for c in ref]
    assert reasons == {"0": "length", "1": "length"} and engine.allocator.num_used == 0


def test_per_request_sampling_and_seeds(model):
    engine = make(model)
    engine.add_request("greedy", [256, 1, 2], 8, ignore_eos=True)
    engine.add_request("hot", [256, 1, 2], 8, SamplingParams(temperature=1.5), seed=1, ignore_eos=True)
    engine.add_request("hot-again", [256, 1, 2], 8, SamplingParams(temperature=1.5), seed=1, ignore_eos=True)
    streams, _ = drain(engine)
    assert streams["hot"] == streams["hot-again"] != streams["greedy"]


def test_abort_mid_generation_frees_pages(model):
    engine = make(model)
    engine.add_request("a", [256, *b"abort me"], 50, ignore_eos=True)
    engine.add_request("b", [256, *b"keep me"], 5, ignore_eos=True)
    engine.step()
    engine.step()
    assert engine.abort("a") and not engine.abort("a")
    streams, reasons = drain(engine)
    assert reasons == {"b": "length"} and len(streams["b"]) == 3  # b's first two tokens came before the drain
    assert engine.allocator.num_used == 0


@pytest.mark.parametrize("prompt, message", [
    ([256, 999], "token ids outside"),
    ([], "the prompt is empty"),
    ([1] * 2000, "does not fit the context"),
])
def test_bad_requests_are_refused(model, prompt, message):
    with pytest.raises(ValueError, match=message):
        make(model).add_request("x", prompt, 4)


def test_request_bigger_than_the_cache_is_refused(model):
    with pytest.raises(ValueError, match="needs 13 KV pages, the cache has 4"):
        make(model, blocks=4).add_request("x", [1] * 40, 10)
