"""The OpenAI-compatible server (colocated mode) over HTTP on localhost."""

import asyncio
import json

import aiohttp
import pytest

from helpers.local_server import serving
from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.config.serve import ServeConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.model.loader import build_model
from moe_pd.serve.api_server import make_server

PROMPT_IDS = [256, *b"Hello server"]


@pytest.fixture(scope="module")
def server():
    """(base URL, engine loop), served from a background event loop thread for the whole module."""
    # no DRAM tier: the node's pool would serve prompts other tests and processes computed
    kv = KVCacheConfig(block_size=4, num_blocks=256, host_tier_gib=0)
    app, engine_loop = make_server(ServeConfig(model=TINY, kvcache=kv,
                                               served_model_name="tiny", max_tokens_limit=64))
    try:
        with serving(app) as url:
            yield url, engine_loop
    finally:
        engine_loop.stop()


def call(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def post(url, path, body, raw=None):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=raw if raw is not None else json.dumps(body)) as r:
            return r.status, await r.json()


async def stream(url, path, body):
    chunks = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: "):
                    chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def offline(prompt, n):
    model = build_model(TINY)
    return OfflineEngine(model, KVCacheConfig(block_size=4, num_blocks=256), 4).generate(
        [prompt], SamplingConfig(max_new_tokens=n, ignore_eos=True))[0].output_ids


def test_greedy_completion_matches_offline_generation(server):
    url, _ = server
    status, body = call(post(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True,
                                                      "return_token_ids": True}))
    assert status == 200 and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["token_ids"] == offline(PROMPT_IDS, 8) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": 8,
                             "total_tokens": len(PROMPT_IDS) + 8, "prompt_tokens_details": {"cached_tokens": 0}}


def test_usage_counts_the_prompt_tokens_served_from_the_cache(server):
    url, _ = server
    prompt = [256, *b"a prompt sent twice: its pages are cached"]  # 42 tokens, 10 whole pages of 4 before the last
    first, second = (call(post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 2})) for _ in range(2))
    assert first[1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second[1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 40}


def test_streaming_chat_gives_the_same_tokens_as_non_streaming(server):
    url, _ = server
    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
           "return_token_ids": True, "ignore_eos": True}
    chunks = call(stream(url, "/v1/chat/completions", {**req, "stream": True}))
    status, whole = call(post(url, "/v1/chat/completions", req))
    assert status == 200 and whole["object"] == "chat.completion"
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["choices"][0]["token_ids"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # OpenAI opens with the role
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) == 7


@pytest.mark.parametrize("path, body, raw, status, message", [
    ("/v1/completions", None, b"{not json", 400, "not valid JSON"),
    ("/v1/completions", {"prompt": ""}, None, 400, "'prompt' is empty"),
    ("/v1/completions", {"prompt": []}, None, 400, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, None, 400, "'max_tokens'=0 is out of range"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, None, 400, "'max_tokens'=10000 is out of range"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, None, 404, "model 'gpt-4' does not exist"),
    ("/v1/completions", {"prompt": "x", "n": 0}, None, 400, "'n'=0 is out of range"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, None, 400, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": [1] * 2000}, None, 400, "does not fit the context"),
    ("/v1/completions", {"prompt": [256, 100000]}, None, 400, "token ids outside"),
    ("/v1/chat/completions", {"messages": []}, None, 400, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None, 400,
     "'messages[0].role' must be one of"),
])
def test_bad_requests_get_openai_errors(server, path, body, raw, status, message):
    url, _ = server
    got_status, got = call(post(url, path, body, raw))
    assert got_status == status
    assert message in got["error"]["message"] and got["error"]["type"]


def test_models_health_metrics(server):
    url, _ = server

    async def get(path):
        async with aiohttp.ClientSession() as s:
            async with s.get(url + path) as r:
                return r.status, await r.text()

    status, text = call(get("/v1/models"))
    assert status == 200 and json.loads(text)["data"][0]["id"] == "tiny"
    status, text = call(get("/health"))
    assert status == 200 and json.loads(text)["status"] == "ok"
    call(post(url, "/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 3}))
    status, text = call(get("/metrics"))
    for name in ("moe_pd_time_to_first_token_seconds", "moe_pd_time_per_output_token_seconds",
                 "moe_pd_requests_total", "moe_pd_kv_cache_usage", "moe_pd_waiting_requests"):
        assert name in text


def test_client_disconnect_aborts_and_frees_pages(server):
    url, engine_loop = server

    async def walk_away():
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 60,
                                                             "ignore_eos": True, "stream": True}) as r:
                await r.content.readline()  # the first chunk has arrived, then the client leaves
        for _ in range(200):
            if engine_loop.num_running == 0 and engine_loop.engine.allocator.num_used == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert call(walk_away())


def test_concurrent_streaming_requests_complete(server):
    url, engine_loop = server

    async def many():
        return await asyncio.gather(*[stream(url, "/v1/completions", {
            "prompt": [256, i, i + 1], "max_tokens": 5 + i % 3, "stream": True, "ignore_eos": True,
            "return_token_ids": True}) for i in range(16)])

    results = call(many())
    for i, chunks in enumerate(results):
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 5 + i % 3
    assert engine_loop.engine.allocator.num_used == 0


def test_streamed_text_never_splits_a_character():
    from moe_pd.engine.tokenizer import ByteTokenizer
    from moe_pd.serve.backend import Chunk
    from moe_pd.serve.openai_output import Choice

    text = Choice(0, ByteTokenizer(256), [])
    pieces = [(text.add(Chunk([b], False)), text.delta())[1] for b in "né✓".encode()]
    assert "".join(pieces) == "né✓" and "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the first byte of é is held back


def test_the_client_request_id_names_the_request(server):
    url, _ = server

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 2},
                              headers={"X-Request-Id": "trace-42"}) as r:
                return r.status, r.headers["X-Request-Id"], await r.json()

    status, header, body = call(go())
    assert status == 200 and header.startswith("trace-42.") and body["id"] == header
