"""Prefill/decode disaggregation in one process, on each KV transfer backend (zmq; NIXL when installed):
decode continues from prefill's KV and first token with the colocated engine's tokens, pages of different
sizes on the two sides, and every failure path ends both records with their pages freed (NIXL: after the
fence when a write may still land)."""

import time

import pytest

from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.engine.core.request import SamplingParams, State
from moe_pd.engine.disagg import DecodeWorker, PrefillWorker
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.kvcache.transfer.base import KVTarget, TransferState
from moe_pd.kvcache.transfer.nixl_agent import nixl_available
from moe_pd.kvcache.transfer.select import make_receiver, make_sender
from moe_pd.model.loader import build_model

PROMPTS = {"a": [256, *b"Disaggregated"], "b": [256, *b"prefill then decode, with a longer prompt"], "c": [256, 7]}
NIXL = pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed"))
FENCE_S = 0.5


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


def make_workers(model, backend, prefill_block=4, decode_block=4, fence_s=FENCE_S):
    # no DRAM tier: the node's pool would serve prompts other tests and processes computed
    kv = KVCacheConfig(block_size=prefill_block, num_blocks=256 // prefill_block, host_tier_gib=0)
    prefill = LLMEngine(model, kv, 8, 16, hold_finished_pages=True)
    decode = LLMEngine(model, KVCacheConfig(block_size=decode_block, num_blocks=256 // decode_block), 8, 64)
    cfg = KVCacheConfig(transfer=backend)
    # KV deadlines far above a loaded machine's prefill time; tests of timeouts set their own
    sender = make_sender(backend, cfg, prefill.cache.kv_LPSW, "prefill", timeout_s=30)
    receiver = make_receiver(backend, cfg, decode.cache.kv_LPSW, "decode", timeout_s=fence_s)
    return PrefillWorker(prefill, sender, timeout_s=30), DecodeWorker(decode, receiver, timeout_s=30)


@pytest.fixture(params=["zmq", NIXL])
def workers(model, request):
    prefill, decode = make_workers(model, request.param)
    yield prefill, decode
    prefill.sender.close()
    decode.receiver.close()


def pd(prefill, decode, rid, prompt, max_new=8, **kw):
    """Reserves on decode, then hands the reservation's target to prefill (as the router does)."""
    req = decode.reserve(rid, prompt, max_new, ignore_eos=True, **kw)
    return prefill.submit(rid, prompt, decode.target(req), **{k: v for k, v in kw.items() if k != "ignore_eos"})


def drive(prefill, decode, seconds=30):
    """Steps both sides until neither holds a request; the request tables' invariants hold after every step."""
    streams, reasons, results = {}, {}, []
    deadline = time.monotonic() + seconds
    while (prefill.has_work or decode.has_work) and time.monotonic() < deadline:
        results += prefill.step()
        prefill.engine.requests.check()
        for out in decode.step():
            streams.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        decode.engine.requests.check()
        time.sleep(0.001)
    return streams, reasons, results


_colocated: dict = {}


def colocated(model, n, params=SamplingParams(), seed=None, prompts=PROMPTS):
    """The colocated engine's tokens (computed once per arguments: the reference of every backend)."""
    key = (n, params, seed, tuple(prompts))
    if key not in _colocated:
        engine = LLMEngine(model, KVCacheConfig(block_size=4, num_blocks=64), 8, 64)
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, n, params, seed, ignore_eos=True)
        out = {}
        while engine.has_work:
            for o in engine.step()[1]:
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        _colocated[key] = out
    return _colocated[key]


def free(*workers):
    return all(w.engine.allocator.num_used == 0 and not w.has_work for w in workers)


@pytest.mark.parametrize("backend", ["zmq", NIXL])
@pytest.mark.parametrize("prefill_block,decode_block", [(4, 16), (16, 4)])
def test_pd_tokens_equal_colocated_across_page_sizes(model, backend, prefill_block, decode_block):
    prefill, decode = make_workers(model, backend, prefill_block, decode_block)
    try:
        for rid, prompt in PROMPTS.items():
            pd(prefill, decode, rid, prompt)  # pages before the transfer starts
        streams, reasons, results = drive(prefill, decode)
        assert streams == colocated(model, 8)
        assert set(reasons.values()) == {"length"}
        assert {r.request_id: r.state for r in results} == {rid: TransferState.DONE for rid in PROMPTS}
        assert {r.request_id: r.nbytes for r in results} == {
            rid: len(p) * TINY.num_hidden_layers * (TINY.kv_lora_rank + TINY.qk_rope_head_dim) * 4
            for rid, p in PROMPTS.items()}  # the prompt's rows, every layer, fp32
        assert free(prefill, decode)
    finally:
        prefill.sender.close()
        decode.receiver.close()


def test_transfer_timeout_frees_the_decode_reservation(workers):
    _, decode = workers
    decode.timeout_s = 0.05
    start = time.monotonic()
    decode.reserve("lost", PROMPTS["a"], 8)
    time.sleep(0.1)
    outputs = decode.step()
    assert outputs[0].finished and outputs[0].finish_reason.startswith("error: KV transfer timed_out")
    fence = decode.receiver.fence_s
    where = decode.engine.requests.describe("lost")
    assert (where["state"] if where else None) == ("fenced" if fence else None)
    while decode.has_work and time.monotonic() - start < 10:  # NIXL: a write may land until the fence ends
        assert decode.step() == []
    assert free(decode) and time.monotonic() - start >= 0.05 + fence


def test_request_aborted_in_prefill_never_reaches_decode(workers):
    """Prefill is told to abort before shipping: decode's reservation fails (NIXL: at once, told by the
    sender that nothing was posted; zmq: at its deadline), and no token is produced."""
    prefill, decode = workers
    decode.timeout_s = 0.3
    pd(prefill, decode, "gone", PROMPTS["b"])
    prefill.step()  # a first prefill chunk ran
    prefill.cancel("gone")
    streams, reasons, results = drive(prefill, decode, seconds=5)
    assert streams.get("gone", []) == [] and reasons["gone"].startswith("error")
    assert results == [] and free(prefill, decode)


def test_decode_without_a_reservation_refuses_the_kv(workers):
    prefill, decode = workers
    prefill.submit("stray", PROMPTS["c"], decode.receiver.target(list(range(2)), 30))
    _, _, results = drive(prefill, decode)
    # zmq: the receiver refuses it; NIXL: the write lands in pages it named and the notice is refused
    want = TransferState.REJECTED if decode.receiver.backend == "zmq" else TransferState.DONE
    assert [r.state for r in results] == [want] and free(prefill, decode)


def test_sampled_tokens_continue_prefills_generator(model, workers):
    """Prefill hands its sampling generator's state to decode, so sampled PD tokens equal colocated ones."""
    params, prompts = SamplingParams(temperature=0.9, top_p=0.95), {"b": PROMPTS["b"]}
    prefill, decode = workers
    pd(prefill, decode, "b", PROMPTS["b"], params=params, seed=11)
    streams, _, _ = drive(prefill, decode)
    assert streams == colocated(model, 8, params, 11, prompts)


def test_decode_abort_before_the_kv_arrives_frees_pages_and_refuses_the_kv(workers):
    prefill, decode = workers
    pd(prefill, decode, "late", PROMPTS["a"])
    decode.abort("late")
    fence = decode.receiver.fence_s
    where = decode.engine.requests.describe("late")
    assert (where["state"] if where else None) == ("fenced" if fence else None)
    _, reasons, results = drive(prefill, decode)
    # zmq: decode refuses the KV; NIXL: the late write's notice proves it ended, so the pages come back at once
    assert [r.state for r in results] == [TransferState.REJECTED if fence == 0 else TransferState.DONE]
    assert reasons == {} and free(prefill, decode)


def test_prefill_gives_up_on_a_decode_rank_that_never_answers(workers):
    prefill, decode = workers
    prefill.timeout_s = 0.2
    if prefill.sender.backend == "zmq":
        target = KVTarget("zmq", "tcp://127.0.0.1:9", 30)  # nobody listens there
        want = TransferState.TIMED_OUT
    else:  # a reservation whose pages lie outside the decode pool: NIXL refuses to post
        target = decode.receiver.target([10**6], 30)
        want = TransferState.FAILED
    prefill.submit("lost", PROMPTS["a"], target)
    _, _, results = drive(prefill, decode, seconds=10)
    assert [(r.request_id, r.state) for r in results] == [("lost", want)]
    assert free(prefill) and prefill.engine.requests.transfers == {want.value: 1}


def test_a_reservation_that_expired_is_never_written(workers):
    prefill, decode = workers
    prefill.submit("stale", PROMPTS["a"], decode.receiver.target([0, 1, 2, 3], 0.0))
    _, _, results = drive(prefill, decode, seconds=10)
    assert [(r.state, r.detail) for r in results] == [
        (TransferState.FAILED, "the decode rank's reservation expired before the transfer")]
    assert free(prefill, decode)


def test_the_table_says_where_a_request_is_and_what_it_holds(workers):
    prefill, decode = workers
    pd(prefill, decode, "x", PROMPTS["b"])
    where = decode.engine.requests.describe("x")
    assert where["state"] == "reserved" and len(where["pages"]) == 11 and where["transfer"]["state"] == "pending"
    assert prefill.engine.requests.describe("x")["state"] == "queued"
    prefill.step()
    assert prefill.engine.requests.describe("x")["state"] == "prefilling"  # 16-token chunks: not done yet
    drive(prefill, decode)
    assert decode.engine.requests.describe("x") is None and prefill.engine.requests.describe("x") is None


def test_pd_logprobs_equal_colocated_prefill_carrying_the_first_and_the_prompts(model, workers):
    """Prefill samples the first token, so its report carries that token's logprob and the prompt's (echo);
    decode's outputs carry the rest. Together they are the colocated engine's."""
    from moe_pd.engine.core.request import SamplingParams

    params = SamplingParams(logprobs=2, prompt_logprobs=2)
    prompt = PROMPTS["b"]
    engine = LLMEngine(model, KVCacheConfig(block_size=4, num_blocks=64), 8, 64)
    engine.add_request("x", prompt, 4, params, ignore_eos=True)
    want, want_prompt = [], None
    while engine.has_work:
        for o in engine.step()[1]:
            want += o.logprobs
            want_prompt = o.prompt_logprobs or want_prompt
    prefill, decode = workers
    req = decode.reserve("x", prompt, 4, SamplingParams(logprobs=2), ignore_eos=True)  # decode never scores the prompt
    prefill.submit("x", prompt, decode.target(req), params)
    got = []
    deadline = time.monotonic() + 30
    results = []
    while (prefill.has_work or decode.has_work) and time.monotonic() < deadline:
        results += prefill.step()
        for out in decode.step():
            got += out.logprobs
    (result,) = results
    close = lambda a, b: a.token == b.token and abs(a.logprob - b.logprob) < 1e-4  # noqa: E731
    assert len(result.prompt_logprobs) == len(prompt) and result.prompt_logprobs[0] is None
    assert all(close(a, b) for a, b in zip(result.prompt_logprobs[1:], want_prompt[1:]))
    assert len(result.logprobs + got) == 4 and all(close(a, b) for a, b in zip(result.logprobs + got, want))


def test_a_lost_nixl_write_fences_the_pages_until_the_deadline_plus_the_fence(model):
    if not nixl_available():
        pytest.skip("NIXL is not installed")
    prefill, decode = make_workers(model, "nixl")
    try:
        prefill.drop_transfers, prefill.timeout_s, decode.timeout_s = 1, 0.3, 0.3
        start = time.monotonic()
        pd(prefill, decode, "dropped", PROMPTS["a"])
        streams, reasons, results = drive(prefill, decode)
        assert [r.state for r in results] == [TransferState.TIMED_OUT]
        assert reasons["dropped"].startswith("error: KV transfer timed_out") and streams["dropped"] == []
        # the sender gave up on a posted write: only the fence frees the reservation
        assert free(prefill, decode) and time.monotonic() - start >= 0.3 + FENCE_S
        assert decode.engine.requests.by_state[State.FENCED] == 0
    finally:
        prefill.sender.close()
        decode.receiver.close()
