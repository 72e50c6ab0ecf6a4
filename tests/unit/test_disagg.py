"""Prefill/decode disaggregation in one process: prefill ships KV over ZeroMQ, decode continues from it."""

import time

import pytest

from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.engine.disagg import DecodeWorker, PrefillWorker
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.kvcache.transfer.base import TransferState
from moe_pd.kvcache.transfer.zmq_transport import KVSender
from moe_pd.model.loader import build_model

PROMPTS = {"a": [256, *b"Disaggregated"], "b": [256, *b"prefill then decode, with a longer prompt"], "c": [256, 7]}


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


def engines(model, prefill_blocks=64, decode_blocks=64):
    prefill = LLMEngine(model, KVCacheConfig(block_size=4, num_blocks=prefill_blocks), 8, 16,
                        hold_finished_pages=True)
    decode = LLMEngine(model, KVCacheConfig(block_size=4, num_blocks=decode_blocks), 8, 64)
    # KV deadlines far above a loaded machine's prefill time; tests of timeouts set their own
    return PrefillWorker(prefill, KVSender("prefill"), timeout_s=30), DecodeWorker(decode, timeout_s=30)


@pytest.fixture
def workers(model):
    prefill, decode = engines(model)
    yield prefill, decode
    prefill.sender.close()
    decode.receiver.close()


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


def colocated(model, n):
    engine = LLMEngine(model, KVCacheConfig(block_size=4, num_blocks=64), 8, 64)
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, n, ignore_eos=True)
    out = {}
    while engine.has_work:
        for o in engine.step()[1]:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def test_pd_tokens_equal_colocated_and_pages_return(model, workers):
    prefill, decode = workers
    for rid, prompt in PROMPTS.items():
        decode.reserve(rid, prompt, 8, ignore_eos=True)  # pages before the transfer starts
        prefill.submit(rid, prompt, decode.address)
    streams, reasons, results = drive(prefill, decode)
    assert streams == colocated(model, 8)
    assert set(reasons.values()) == {"length"}
    assert {r.request_id: r.state for r in results} == {rid: TransferState.DONE for rid in PROMPTS}
    assert prefill.engine.allocator.num_used == 0 and decode.engine.allocator.num_used == 0


def test_transfer_timeout_frees_the_decode_reservation(workers):
    _, decode = workers
    decode.timeout_s = 0.05
    decode.reserve("lost", PROMPTS["a"], 8)
    time.sleep(0.1)
    outputs = decode.step()
    assert outputs[0].finished and outputs[0].finish_reason.startswith("error")
    assert decode.engine.allocator.num_used == 0 and not decode.has_work


def test_request_aborted_in_prefill_never_reaches_decode(workers):
    prefill, decode = workers
    decode.timeout_s = 0.3
    decode.reserve("gone", PROMPTS["b"], 8)
    prefill.submit("gone", PROMPTS["b"], decode.address)
    prefill.step()  # a first prefill chunk ran
    prefill.cancel("gone")
    streams, reasons, results = drive(prefill, decode, seconds=5)
    assert streams.get("gone", []) == [] and reasons["gone"].startswith("error")  # timed out, never filled
    assert results == [] and prefill.engine.allocator.num_used == 0
    assert decode.engine.allocator.num_used == 0


def test_decode_without_a_reservation_rejects_the_kv(workers):
    prefill, decode = workers
    prefill.submit("stray", PROMPTS["c"], decode.address)
    _, _, results = drive(prefill, decode)
    assert [r.state for r in results] == [TransferState.REJECTED]
    assert prefill.engine.allocator.num_used == 0


def test_sampled_tokens_continue_prefills_generator(model, workers):
    """Prefill hands its sampling generator's state to decode, so sampled PD tokens equal colocated ones."""
    from moe_pd.engine.core.request import SamplingParams

    params = SamplingParams(temperature=0.9, top_p=0.95)
    engine = LLMEngine(model, KVCacheConfig(block_size=4, num_blocks=64), 8, 64)
    engine.add_request("s", PROMPTS["b"], 8, params, seed=11, ignore_eos=True)
    expected = []
    while engine.has_work:
        expected += [t for o in engine.step()[1] for t in o.new_token_ids]
    prefill, decode = workers
    decode.reserve("s", PROMPTS["b"], 8, params, seed=11, ignore_eos=True)
    prefill.submit("s", PROMPTS["b"], decode.address, params, seed=11)
    streams, _, _ = drive(prefill, decode)
    assert streams["s"] == expected


def test_decode_abort_before_the_kv_arrives_frees_pages_and_rejects_the_kv(workers):
    prefill, decode = workers
    decode.reserve("late", PROMPTS["a"], 8)
    decode.abort("late")
    assert decode.engine.allocator.num_used == 0 and not decode.has_work
    prefill.submit("late", PROMPTS["a"], decode.address)
    _, _, results = drive(prefill, decode)
    assert [r.state for r in results] == [TransferState.REJECTED]
    assert prefill.engine.allocator.num_used == 0 and decode.engine.allocator.num_used == 0


def test_prefill_gives_up_on_a_decode_rank_that_never_answers(workers):
    prefill, decode = workers
    prefill.timeout_s = 0.2
    prefill.submit("lost", PROMPTS["a"], "tcp://127.0.0.1:9")  # nobody listens there
    _, _, results = drive(prefill, decode, seconds=10)
    assert [(r.request_id, r.state) for r in results] == [("lost", TransferState.TIMED_OUT)]
    assert prefill.engine.allocator.num_used == 0 and not prefill.has_work
    assert prefill.engine.requests.transfers == {"timed_out": 1}


def test_the_table_says_where_a_request_is_and_what_it_holds(workers):
    prefill, decode = workers
    decode.reserve("x", PROMPTS["b"], 8)
    where = decode.engine.requests.describe("x")
    assert where["state"] == "reserved" and len(where["pages"]) == 11 and where["transfer"]["state"] == "pending"
    prefill.submit("x", PROMPTS["b"], decode.address)
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
    decode.reserve("x", prompt, 4, SamplingParams(logprobs=2), ignore_eos=True)  # decode never scores the prompt
    prefill.submit("x", prompt, decode.address, params)
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
