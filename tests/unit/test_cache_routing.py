"""Routing by what the caches report: the ranks' cache events (device pages, the node's DRAM and disk tiers)
reach the leader, which places a prompt on the rank holding its prefix and forwards them to the routers; a
router sends a prompt to the instance whose device pages or node tiers hold its longest prefix, forgets
what a restarted instance's device held, and never guesses from what it sent. Keys chain from the model
digest, so a router process computes the same keys as the ranks."""

from __future__ import annotations

import subprocess
import sys

import msgspec

from moe_pd.config.serve import RouterConfig, ServiceConfig
from moe_pd.kvcache.tiers.identity import chain_keys
from moe_pd.serve import protocol as p
from moe_pd.serve.cache_index import CacheIndex, prompt_keys
from moe_pd.serve.leader import Leader
from moe_pd.serve.metrics import Metrics
from moe_pd.serve.router import ClusterBackend

ROOT, BS = b"model digest 16b", 4
PROMPT = list(range(1, 30))  # 29 tokens: 7 whole pages a cache may serve


def keys(tokens=PROMPT, n=None):
    return prompt_keys(ROOT, tokens, BS)[:n]


def test_index_counts_device_pages_holds_tier_pages_and_joins_them_in_a_run():
    index = CacheIndex()
    index.apply(("device", "a"), keys(n=3), [])
    index.apply(("device", "a"), keys(n=2), [])  # a second rank holds the first two pages too
    index.apply(("device", "a"), [], keys(n=2))  # one of them evicts them
    assert index.run(keys(), [("device", "a")]) == 3
    index.apply(("dram", "node1"), keys()[3:6], [], counted=False)
    index.apply(("dram", "node1"), keys()[3:6], [], counted=False)
    assert index.run(keys(), [("device", "a"), ("dram", "node1")]) == 6  # device pages, then DRAM
    assert index.run(keys(), [("dram", "node1")]) == 0  # a prefix must start at the first page
    index.apply(("dram", "node1"), [], [keys()[4]], counted=False)  # once removed, gone (not counted)
    assert index.run(keys(), [("device", "a"), ("dram", "node1")]) == 4
    small = CacheIndex(capacity=2)
    small.apply("x", keys(n=3), [])
    assert small.keys("x") == keys()[1:3]  # the oldest key goes first


def test_keys_are_the_same_in_another_process():
    code = ("from moe_pd.serve.cache_index import prompt_keys; "
            f"print(prompt_keys({ROOT!r}, {PROMPT!r}, {BS})[-1].hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == keys()[-1].hex()
    assert [k for k, _, _ in chain_keys(ROOT, PROMPT, BS)][:7] == keys()


def leader(world_size=2):
    made = Leader(ServiceConfig(role="prefill", port=0), world_size, "prefill-test", BS, 1024, ROOT,
                  {"dram": "host:/dev/shm/pool", "disk": ""})
    made.loads = [p.RankLoad(r, 0, 100, 0, 0, 0, 8) for r in range(world_size)]
    return made


def report(rank, *events):
    return p.RankReport(rank, p.RankLoad(rank, 0, 100, 0, 0, 0, 8), cache=list(events))


def test_leader_places_a_prompt_on_the_rank_whose_pages_hold_its_prefix_and_counts_the_node_tier():
    lead = leader()
    try:
        lead.observe_cache([report(0), report(1, p.CacheEvents("device", keys(n=5)))])
        assert lead._cached_per_rank(PROMPT) == {0: 0, 1: 20}
        lead.observe_cache([report(0, p.CacheEvents("dram", keys(), []))])  # the node's DRAM: every rank's
        assert lead._cached_per_rank(PROMPT) == {0: 28, 1: 28}
        lead.observe_cache([report(1, p.CacheEvents("device", [], keys(n=5))),
                            report(0, p.CacheEvents("dram", [], keys()[2:]))])
        assert lead._cached_per_rank(PROMPT) == {0: 8, 1: 8}
        assert lead.status().cache_root == ROOT and lead.status().tier_domains == {"dram": "host:/dev/shm/pool"}
    finally:
        lead.close()


class Client:
    """An instance as the router's backend sees it (address, role, latest status)."""

    def __init__(self, address, role="prefill", dram="", queued=0):
        self.address, self.role, self.up, self.queued_tokens = address, role, True, queued
        self.status = p.Status(p.PROTOCOL_VERSION, address, role, BS, cache_root=ROOT,
                               tier_domains={"dram": dram} if dram else {})


def router(*clients):
    backend = ClusterBackend(RouterConfig(prefill=["tcp://127.0.0.1:9"], decode=["tcp://127.0.0.1:9"]))
    backend.prefill = list(clients)
    return backend


def test_router_routes_by_the_reported_device_pages_and_node_tiers_not_by_what_it_sent():
    a, b, c = Client("a", dram="node1:/pool"), Client("b", dram="node1:/pool"), Client("c", dram="node2:/pool")
    backend = router(a, b, c)
    try:
        assert backend.pick_prefill(backend.prefill, PROMPT) is a  # nothing known: shortest queue, then the name
        assert backend.cached_prefix(PROMPT, [a, b, c]) == {"a": 0, "b": 0, "c": 0}  # sending taught it nothing
        backend._on_message(c, p.Cached([p.CacheEvents("device", keys(n=6))]))
        assert backend.pick_prefill(backend.prefill, PROMPT) is c
        # node1's DRAM holds the whole prefix: both instances on that node reach it
        backend._on_message(a, p.Cached([p.CacheEvents("dram", keys())]))
        assert backend.cached_prefix(PROMPT, [a, b, c]) == {"a": 28, "b": 28, "c": 24}
        b.queued_tokens = 0
        a.queued_tokens = 500
        assert backend.pick_prefill(backend.prefill, PROMPT) is b  # as long a prefix, shorter queue
        backend._on_message(b, p.Cached([p.CacheEvents("dram", [], keys()[1:])]))  # node1's pool evicted them
        assert backend.cached_prefix(PROMPT, [a, b, c]) == {"a": 4, "b": 4, "c": 24}
        backend._on_down(c)  # a restarted instance's device pages are gone
        assert backend.cached_prefix(PROMPT, [c])["c"] == 0
        backend._on_message(c, p.Cached([p.CacheEvents("device", keys(n=2))]))
        backend._on_message(c, p.Cached([p.CacheEvents("device", keys(n=1))], snapshot=True))
        assert backend.cached_prefix(PROMPT, [c])["c"] == 4  # a snapshot replaces what was known
    finally:
        for inst in backend.instances:
            inst.socket.close(0)
        backend.context.term()


def test_tier_figures_reach_metrics_summed_over_ranks_and_sized_by_the_node():
    figures = [p.TierFigures({"device": 16, "dram": 32}, {"dram": 8}, 2, 1, 0.5, {"dram": 10, "disk": 10}, 1,
                             {"dram": 4096, "disk": 8192}, {"dram": 1, "disk": 2}),
               p.TierFigures({"device": 4, "disk": 64}, {"disk": 16}, 3, 0, 0.25, {"dram": 5}, 0,
                             {"dram": 4096, "disk": 8192}, {"dram": 1, "disk": 2})]
    ranks = [msgspec.to_builtins(p.RankLoad(r, 0, 100, 0, 0, 0, 8, tiers=f)) for r, f in enumerate(figures)]
    metrics = Metrics()
    metrics.instance("prefill@x", "prefill", True, ranks)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    labels = 'instance="prefill@x",role="prefill"'
    for line in (f'moe_pd_kv_cache_hit_tokens{{{labels},source="dram"}} 32.0',
                 f'moe_pd_kv_cache_hit_tokens{{{labels},source="disk"}} 64.0',
                 f'moe_pd_kv_tier_promoted_pages{{{labels},tier="disk"}} 16.0',
                 f'moe_pd_kv_tier_demoted_pages{{{labels},tier="dram"}} 15.0',
                 f'moe_pd_kv_tier_bytes{{{labels},tier="disk"}} 8192.0',
                 f'moe_pd_kv_tier_entries{{{labels},tier="disk"}} 2.0',
                 f'moe_pd_kv_tier_promotions{{{labels}}} 5.0',
                 f'moe_pd_kv_tier_promotion_misses{{{labels}}} 1.0',
                 f'moe_pd_kv_tier_load_seconds_sum{{{labels}}} 0.75',
                 f'moe_pd_kv_tier_corrupt_entries{{{labels}}} 1.0'):
        assert line in text, line


def test_leader_forwards_cache_events_and_gives_a_router_that_says_hello_a_snapshot():
    from test_service_leader import Router, exchange

    lead = leader()
    client = Router(lead.address)
    try:
        lead.observe_cache([report(1, p.CacheEvents("device", keys(n=3)))])  # before any router: kept here
        exchange(lead, client, p.Hello(p.PROTOCOL_VERSION), expect=2)
        status, snapshot = client.take_answers(2)
        assert isinstance(status, p.Status) and snapshot == p.Cached([p.CacheEvents("device", keys(n=3))], True)
        lead.observe_cache([report(0, p.CacheEvents("device", keys()[3:5])),
                            report(1, p.CacheEvents("dram", keys(), [])), report(0, p.CacheEvents("device", []))])
        (update,) = client.take_answers(1)
        assert update == p.Cached([p.CacheEvents("device", keys()[3:5]), p.CacheEvents("dram", keys())])
    finally:
        client.socket.close(0)
        lead.close()
