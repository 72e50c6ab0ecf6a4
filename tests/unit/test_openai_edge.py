"""The OpenAI API at the edge, against the one-process server (tests/dist/test_chaos.py runs the hostile half
through a PD cluster): every hostile request gets its status with an OpenAI JSON error naming the parameter
and leaves nothing behind; valid requests at the edges of every range are served; and the parameters are
honoured as OpenAI documents them: stop (across streamed chunks), logprobs, echo, n, several prompts, usage
(streams too), max_completion_tokens, chat content parts and the developer role, delta.role, /tokenize."""

import asyncio
import json
import math

import aiohttp
import pytest

from helpers.hostile import ACCEPTED, HOSTILE, check_error, send
from helpers.local_server import serving
from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.serve import ServeConfig
from moe_pd.serve.api_server import make_server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server():
    app, engine_loop = make_server(ServeConfig(model=TINY, kvcache=KVCacheConfig(block_size=4, num_blocks=256),
                                               served_model_name="tiny", max_tokens_limit=900))
    with serving(app) as url:
        yield url, engine_loop
    engine_loop.stop()


def call(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def post(url, path, body):
    status, got, _ = call(send(url, path, body))
    return status, got


async def sse(url, path, body):
    events = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json={**body, "stream": True}) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: "):
                    events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def idle(engine_loop, timeout=10.0):
    """Waits until the engine holds nothing (no request, no page)."""
    async def wait():
        for _ in range(int(timeout / 0.02)):
            if not engine_loop.engine.requests.live and engine_loop.engine.allocator.num_used == 0:
                return True
            await asyncio.sleep(0.02)
        return False
    return call(wait())


def greedy(**extra):
    return {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **extra}


# hostile input -----------------------------------------------------------------------------------------------
def test_at_least_forty_hostile_requests_are_refused_with_json_errors_and_leave_nothing(server):
    url, engine_loop = server
    assert len(HOSTILE) >= 40
    for case in HOSTILE:
        check_error(case, *call(send(url, case[1], case[2])))
    assert idle(engine_loop)
    status, body = post(url, "/v1/completions", greedy(max_tokens=2))  # and it serves on
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_valid_requests_at_every_edge_are_served(server):
    url, engine_loop = server
    for name, path, body in ACCEPTED:
        status, got = post(url, path, body)
        assert status == 200, (name, got)
        assert all(c["finish_reason"] in ("stop", "length") for c in got["choices"]), (name, got)
    assert idle(engine_loop)


def test_three_hundred_rejected_requests_leave_nothing_behind(server):
    url, engine_loop = server

    async def many():
        bad = [{"prompt": "x", "seed": 2**64 + i} for i in range(150)] + \
              [{"prompt": [256, 400 + i]} for i in range(150)]
        return await asyncio.gather(*(send(url, "/v1/completions", b) for b in bad))

    assert {status for status, _, _ in call(many())} == {400}
    assert idle(engine_loop) and engine_loop.engine.requests.aborted >= 0
    assert post(url, "/v1/completions", greedy(max_tokens=1))[0] == 200


# stop --------------------------------------------------------------------------------------------------------
def test_a_stop_string_ends_the_text_before_it_streamed_or_not(server):
    url, engine_loop = server
    full = post(url, "/v1/completions", greedy())[1]["choices"][0]["text"]
    stop = full[3:6]  # three bytes: three tokens of the byte tokenizer, so it spans streamed chunks
    assert len(stop.encode()) >= 2 and full.find(stop) >= 1
    status, body = post(url, "/v1/completions", greedy(stop=[stop, "never"]))
    choice = body["choices"][0]
    assert choice["text"] == full[: full.find(stop)] and choice["finish_reason"] == "stop"
    chunks = call(sse(url, "/v1/completions", greedy(stop=stop)))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert idle(engine_loop)  # the stopped sequence was aborted, its pages freed


# logprobs and echo ---------------------------------------------------------------------------------------------
def test_completion_logprobs_are_the_models_and_greedy_tokens_are_the_top_ones(server):
    url, _ = server
    body = post(url, "/v1/completions", greedy(max_tokens=4, logprobs=3))[1]
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and math.isclose(value, max(top.values())) and 3 <= len(top) <= 4
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert len(set(map(tuple, (t.keys() for t in lp["top_logprobs"])))) >= 1


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server):
    """lm_eval's loglikelihood: logprobs=1, echo=True, max_tokens=1, token ids as prompts (several at once)."""
    url, _ = server
    prompts = [[72, 101, 108, 108, 111], [87, 111, 114, 108, 100, 33]]
    body = post(url, "/v1/completions", {"prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
                                         "temperature": 0})[1]
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for prompt, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
        assert choice["text"].startswith(bytes(prompt).decode())
        # the generated token's logprob equals the prompt logprob of the same position when it is echoed
        extended = post(url, "/v1/completions", {"prompt": prompt + [choice["token_ids"][0] if "token_ids" in choice
                                                                      else ord(lp["tokens"][-1])],
                                                 "max_tokens": 1, "logprobs": 0, "echo": True, "temperature": 0})[1]
        assert math.isclose(extended["choices"][0]["logprobs"]["token_logprobs"][len(prompt)],
                            lp["token_logprobs"][-1], rel_tol=1e-4, abs_tol=1e-4)
    assert body["usage"]["prompt_tokens"] == 11 and body["usage"]["completion_tokens"] == 2


def test_chat_logprobs_and_streamed_completion_logprobs(server):
    url, _ = server
    body = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                              "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                              "ignore_eos": True})[1]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    chunks = call(sse(url, "/v1/completions", greedy(max_tokens=3, logprobs=1)))
    streamed = [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    whole = post(url, "/v1/completions", greedy(max_tokens=3, logprobs=1))[1]["choices"][0]["logprobs"]
    assert streamed == whole["token_logprobs"]


# n, several prompts, usage ------------------------------------------------------------------------------------
def test_n_and_several_prompts_give_every_choice_with_usage(server):
    url, _ = server
    body = post(url, "/v1/completions", {"prompt": ["a", "bc"], "n": 3, "max_tokens": 5, "temperature": 1.0,
                                         "seed": 7, "ignore_eos": True})[1]
    assert sorted(c["index"] for c in body["choices"]) == list(range(6))
    assert body["usage"] == {"prompt_tokens": 2 + 3, "completion_tokens": 30, "total_tokens": 35,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # no whole page to serve from a cache
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert len(set(texts[:3])) > 1  # the samples of one prompt differ (seeds seed, seed + 1, ...)
    again = post(url, "/v1/completions", {"prompt": ["a", "bc"], "n": 3, "max_tokens": 5, "temperature": 1.0,
                                          "seed": 7, "ignore_eos": True})[1]
    assert [c["text"] for c in sorted(again["choices"], key=lambda c: c["index"])] == texts  # seeded


def test_include_usage_ends_the_stream_and_chat_streams_open_with_the_role(server):
    url, _ = server
    chunks = call(sse(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                    "max_completion_tokens": 4, "ignore_eos": True, "temperature": 0,
                                                    "stream_options": {"include_usage": True}}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4  # max_completion_tokens
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    chunks = call(sse(url, "/v1/completions", greedy(max_tokens=3, stream_options={  # guidellm asks for both
        "include_usage": True, "continuous_usage_stats": True})))
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3] and chunks[-1]["choices"] == []


def test_content_parts_and_the_developer_role_are_the_string_and_system_forms(server):
    url, _ = server
    plain = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
             "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    parts = {**plain, "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                   {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                {"type": "text", "text": "there"}]}]}
    a, b = post(url, "/v1/chat/completions", plain)[1], post(url, "/v1/chat/completions", parts)[1]
    counts = lambda usage: {k: v for k, v in usage.items() if k != "prompt_tokens_details"}  # noqa: E731
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and counts(a["usage"]) == counts(b["usage"])
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt, served from the cache


def test_penalties_change_a_repetitive_greedy_output(server):
    url, _ = server
    plain = post(url, "/v1/completions", greedy(max_tokens=24, return_token_ids=True))[1]["choices"][0]["token_ids"]
    penalized = post(url, "/v1/completions", greedy(max_tokens=24, return_token_ids=True, frequency_penalty=2.0,
                                                    presence_penalty=2.0))[1]["choices"][0]["token_ids"]
    if len(set(plain)) < len(plain):  # the tiny random model repeats itself; penalties make it repeat less
        assert len(set(penalized)) > len(set(plain))


def test_tokenize_and_detokenize_as_vllm_and_sglang(server):
    url, _ = server
    status, body = post(url, "/tokenize", {"prompt": "héllo"})
    assert status == 200 and body["tokens"] == [256, *"héllo".encode()] and body["count"] == 7
    assert post(url, "/tokenize", {"prompt": "hi", "add_special_tokens": False})[1]["tokens"] == [104, 105]
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})[1]["tokens"]
    assert bytes(chat[1:]).decode() == "user: hi\nassistant:"
    body = post(url, "/detokenize", {"tokens": [256, *"héllo".encode()]})[1]
    assert body["prompt"] == body["text"] == "héllo"


# disconnects and hostile sampling ------------------------------------------------------------------------------
def test_a_non_streaming_client_that_disconnects_is_aborted(server):
    url, engine_loop = server

    async def walk_away():
        async with aiohttp.ClientSession() as s:
            try:
                await s.post(url + "/v1/completions", json=greedy(max_tokens=900),
                             timeout=aiohttp.ClientTimeout(total=0.5))
            except asyncio.TimeoutError:
                pass  # the client gave up and closed its connection
        aborted = engine_loop.engine.requests.aborted
        return aborted

    before = engine_loop.engine.requests.aborted
    call(walk_away())
    assert idle(engine_loop, timeout=3)  # much sooner than 900 tokens take
    assert engine_loop.engine.requests.aborted == before + 1  # aborted, not decoded to max_tokens


def test_non_finite_logits_fail_that_request_alone():
    import torch

    from moe_pd.engine.core.request import SamplingParams
    from moe_pd.engine.sampler import sample

    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan")] * 3, [float("-inf")] * 3, [1.0, float("nan"), 0.5]])
    params = [SamplingParams(temperature=1e-30), SamplingParams(), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_p=1e-9)]
    gens = [None, None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    assert sample(logits, params, gens) == [2, None, None, 0]
