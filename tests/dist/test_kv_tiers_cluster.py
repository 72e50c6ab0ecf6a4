"""The KV tiers in the PD cluster of launch/local.sh (issue 14's "done when"): with device pools far too small
for the prompts, revisits get >= 90% of their whole-page prefix from the host DRAM tier (shared by both
prefill ranks and the decode instance), or from the disk tier alone (kvcache.host_tier_gib=0) across a
restart of the whole cluster, with the tokens of the cold run; the router's /metrics and every response's
usage.prompt_tokens_details.cached_tokens say so."""

import time

import pytest

from helpers.cluster import Cluster, complete, run, stream

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]

BOS, BS = 256, 16
PROMPTS = [[BOS, *f"Conversation {i}: {'lorem ipsum dolor sit amet ' * 4}".encode()] for i in range(8)]
"""Eight prompts of 125 tokens, 8 pages each: 64 pages for prefill pools of 2 x 16 pages."""
OVERRIDES = [f"kvcache.block_size={BS}", "prefill:kvcache.num_blocks=16", "decode:kvcache.num_blocks=32",
             "runtime.log_level=WARNING"]
RANKS = {"PREFILL_RANKS": "2", "DECODE_RANKS": "1"}


def serve(cluster, prompts=PROMPTS):
    """Each prompt in turn (greedy): [(token ids, cached tokens)]."""
    body = lambda p: {"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    out = []
    for prompt in prompts:
        status, answer = run(complete(cluster.url, body(prompt)))
        assert status == 200, answer
        out.append((answer["choices"][0]["token_ids"], answer["usage"]["prompt_tokens_details"]["cached_tokens"]))
    return out


def cached_share(served) -> float:
    """Cached tokens over the whole-page prefixes a cache could serve (a token is always left to compute)."""
    return sum(c for _, c in served) / sum((len(p) - 1) // BS * BS for p in PROMPTS)


def hits(cluster, source: str, at_least: float, timeout: float = 5) -> float:
    """Prompt tokens the instances served from `source`, per the router's /metrics, once it reaches
    `at_least` or `timeout` passed (a rank recounts its figures about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = sum(v for k, v in cluster.metrics().items()
                    if k.startswith("moe_pd_kv_cache_hit_tokens{") and f'source="{source}"' in k)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_revisits_hit_the_node_dram_tier_with_the_cold_runs_tokens(tmp_path):
    cluster = Cluster.local(tmp_path / "dram", *OVERRIDES, f"kvcache.host_tier_path={tmp_path}/pool",
                            "kvcache.host_tier_gib=0.01", **RANKS)
    try:
        cold = serve(cluster)
        assert all(c == 0 for _, c in cold)
        again = serve(cluster)
        assert [t for t, _ in again] == [t for t, _ in cold]
        assert cached_share(again) >= 0.9
        # at least half from DRAM: the prefill ranks' 32 device pages hold at most 4 of the 8 prompts
        served = sum(c for _, c in again)
        assert hits(cluster, "dram", served / 2) >= served / 2
        # streaming says it too, in the usage chunk that include_usage adds before [DONE]
        events = run(stream(cluster.url, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True,
                                          "stream_options": {"include_usage": True}}))
        assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.9 * (len(PROMPTS[0]) - 1) // BS * BS
    finally:
        cluster.stop()


def test_disk_only_tier_hits_across_a_restart_with_the_cold_runs_tokens(tmp_path):
    overrides = [*OVERRIDES, "kvcache.host_tier_gib=0", f"kvcache.disk_tier_dir={tmp_path}/disk"]
    first = Cluster.local(tmp_path / "first", *overrides, **RANKS)
    try:
        cold = serve(first)
    finally:
        first.stop()  # each rank's tier thread finishes its disk writes before it exits
    assert all(c == 0 for _, c in cold)
    second = Cluster.local(tmp_path / "second", *overrides, **RANKS)
    try:
        again = serve(second)
        assert [t for t, _ in again] == [t for t, _ in cold]
        assert cached_share(again) >= 0.9
        served = sum(c for _, c in again)
        assert hits(second, "disk", served) == served  # all of it: nothing else survived the restart
    finally:
        second.stop()
