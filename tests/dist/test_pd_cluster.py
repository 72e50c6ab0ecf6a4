"""The PD cluster of launch/local.sh over HTTP: the same tokens as colocated serving and offline generation,
many concurrent streams, OpenAI errors for bad input, and no KV page left behind. Its KV moves over NIXL
(kvcache.transfer=nixl, the CPU default) between pages of 16 tokens on prefill and 8 on decode."""

import asyncio
import json

import pytest
from hydra import compose, initialize_config_module

from helpers.cluster import Cluster, complete, run, stream, transfers
from moe_pd.config.store import to_config
from moe_pd.generate import run as generate_offline

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]

BOS = 256
SHARED = [BOS, *b"You are a helpful assistant. Answer briefly and exactly. "]  # 58 tokens: 3 full pages of 16
PROMPTS = {
    "distinct": [[BOS, *b"Hello"], [BOS, *b"PD disaggregation splits prefill from decode" * 3], [BOS, *b"1, 2"],
                 [BOS, *b"The quick brown fox jumps over the lazy dog"]],
    "shared_prefix": [SHARED + list(b"What is 2+2?"), SHARED + list(b"Name a colour."), SHARED + list(b"Hi"),
                      SHARED + list(b"What is MoE?")],
}
MAX_TOKENS = 10
OVERRIDES = ["kvcache.block_size=16", "kvcache.num_blocks=256", "runtime.log_level=WARNING"]
NIXL = ["kvcache.transfer=nixl", "decode:kvcache.block_size=8", "decode:kvcache.num_blocks=512"]


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    pytest.importorskip("nixl._api", reason="NIXL is installed by launch/setup_env.sh (pip install --no-deps)")
    cluster = Cluster.local(tmp_path_factory.mktemp("pd"), *OVERRIDES, *NIXL)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    cluster = Cluster.local(tmp_path_factory.mktemp("colocated"), *OVERRIDES, mode="colocated",
                            COLOCATED_RANKS="2")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def offline():
    """`moe_pd.generate`'s records for every prompt (one process, the reference)."""
    prompts = [p for group in PROMPTS.values() for p in group]
    overrides = [f"prompt_ids={json.dumps(prompts)}", f"sampling.max_new_tokens={MAX_TOKENS}",
                 "sampling.ignore_eos=true", "kvcache.block_size=16", "kvcache.num_blocks=256"]
    with initialize_config_module("moe_pd.conf", version_base=None):
        records = generate_offline(to_config(compose("generate", overrides=overrides)))
    return {tuple(r["prompt_ids"]): r["output_ids"] for r in records}


def served_tokens(url, prompts, sequential):
    body = lambda p: {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                      "return_token_ids": True}

    async def go():
        if sequential:  # one after another: each later prompt finds the shared prefix cached
            return [await complete(url, body(p)) for p in prompts]
        return await asyncio.gather(*(complete(url, body(p)) for p in prompts))

    answers = run(go())
    assert all(status == 200 for status, _ in answers), answers
    return [a["choices"][0]["token_ids"] for _, a in answers]


@pytest.mark.parametrize("group", PROMPTS)
def test_pd_colocated_and_offline_give_the_same_greedy_tokens(pd, colocated, offline, group):
    prompts = PROMPTS[group]
    want = [offline[tuple(p)] for p in prompts]
    cached_before = sum(r["cached_tokens"] for i in pd.health()[1]["instances"] for r in i["ranks"])
    assert served_tokens(pd.url, prompts, sequential=group == "shared_prefix") == want
    assert served_tokens(colocated.url, prompts, sequential=group == "shared_prefix") == want
    if group == "shared_prefix":  # the prefix-cache hit path ran on the prefill instance
        pd.wait_idle()
        cached = sum(r["cached_tokens"] for i in pd.health()[1]["instances"] for r in i["ranks"])
        assert cached - cached_before >= 3 * 48
    assert set(pd.wait_idle().values()) == {0}


def test_64_concurrent_streams_complete_with_their_token_counts(pd):
    counts = [1 + i % 13 for i in range(64)]

    async def go():
        return await asyncio.gather(*(
            stream(pd.url, {"prompt": [BOS, *f"request {i}: ".encode()], "max_tokens": n, "ignore_eos": True,
                            "return_token_ids": True}) for i, n in enumerate(counts)))

    for n, events in zip(counts, run(go(), timeout=300)):
        assert "error" not in events[-1], events[-1]
        assert sum(len(e["choices"][0]["token_ids"]) for e in events) == n
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert set(pd.wait_idle().values()) == {0}
    metrics = pd.metrics()
    assert transfers(metrics, "done", "nixl") >= 64 and transfers(metrics, "done", "zmq") == 0
    assert metrics['moe_pd_kv_transfer_bytes_total{backend="nixl"}'] > 0
    assert metrics['moe_pd_kv_transfer_seconds_count{backend="nixl"}'] >= 64


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 400, "'prompt' is empty"),
    ({"prompt": [BOS] * 1024}, 400, "does not fit the context of 1024"),
    ({"prompt": [BOS, 5000]}, 400, "token ids outside [0, 320)"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "'max_tokens'=0 is out of range"),
    ({"prompt": "hi", "max_tokens": 10**6}, 400, "'max_tokens'=1000000 is out of range"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
    ({"prompt": "hi", "temperature": -1}, 400, "'temperature'=-1 is out of range"),
    ({"prompt": "hi", "n": 0}, 400, "'n'=0 is out of range"),
    ({"prompt": "hi", "stream": "false"}, 400, "'stream' must be true or false"),
])
def test_bad_input_gets_an_openai_error_from_the_router(pd, body, status, message):
    got, answer = run(complete(pd.url, body))
    assert got == status and message in answer["error"]["message"], answer
    assert answer["error"]["code"] == status


def test_malformed_json_is_a_400(pd):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(pd.url + "/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and "not valid JSON" in err.value.read().decode()


def decode_aborts(cluster):
    return sum(r["aborted"] for i in cluster.health()[1]["instances"] if i["role"] == "decode" for r in i["ranks"])


def test_client_disconnect_aborts_on_every_instance(pd):
    before = decode_aborts(pd)

    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async with s.post(pd.url + "/v1/completions", json={"prompt": [BOS, 1, 2], "max_tokens": 900,
                                                                 "ignore_eos": True, "stream": True}) as r:
                seen = 0
                async for line in r.content:
                    seen += line.startswith(b"data: ")
                    if seen >= 3:
                        break  # leaves with the request still decoding

    run(go())
    assert pd.wait_metric('moe_pd_requests_total{outcome="aborted"}', 1) >= 1
    assert set(pd.wait_idle().values()) == {0}
    assert decode_aborts(pd) == before + 1  # freed by the abort, not by running to its end


def test_the_readme_demo_client_runs_against_the_cluster(pd):
    import subprocess
    import sys

    from helpers.cluster import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "launch/demo_client.py"), "--url", pd.url, "--max-tokens", "6"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(streaming)" in proc.stdout and "KV transfers (nixl):" in proc.stdout, proc.stdout
    assert proc.stdout.count("(6 tokens, length)") + proc.stdout.count("tokens, stop)") == 2


def test_bench_serving_measures_both_clusters(pd, colocated, tmp_path):
    import subprocess
    import sys

    from helpers.cluster import ROOT

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "perf/bench_serving.py"), "--pd-url", pd.url, "--colocated-url",
                           colocated.url, "--rates", "8", "--requests", "6", "--input-len", "8,32", "--output-len", "2,6",
                           "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {m: results[m]["8.0"]["ok"] for m in ("pd", "colocated")} == {"pd": 6, "colocated": 6}
    assert "goodput PD / colocated" in proc.stdout
