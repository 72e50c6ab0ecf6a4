"""Faults in a PD cluster of instances started one by one: a KV transfer that never arrives, a decode rank
killed mid-run (its request migrates to another decode instance), a dead prefill instance. The router stays
up, requests get their answer, and no KV page is left behind. tests/dist/test_chaos.py does more under
launch/local.sh."""

import os
import signal
import time

import pytest

from helpers.cluster import Cluster, complete, run, stream, transfers
from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.model.loader import build_model

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]

BOS = 256
PROMPT = [BOS, *b"A transfer that fails is retried once"]
QUIET = ["kvcache.block_size=16", "kvcache.num_blocks=256", "runtime.log_level=WARNING"]


def expected(prompt, n):
    engine = OfflineEngine(build_model(TINY), KVCacheConfig(block_size=16, num_blocks=64), 1)
    return engine.generate([prompt], SamplingConfig(max_new_tokens=n, ignore_eos=True))[0].output_ids


def greedy(prompt, n):
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "return_token_ids": True}


@pytest.mark.parametrize("backend", ["zmq", "nixl"])
def test_a_dropped_kv_transfer_times_out_frees_its_pages_and_is_rerun_once(tmp_path, backend):
    """zmq: the decode reservation is freed at its deadline. NIXL: the lost write may still land, so the
    reservation stays fenced for one KV timeout past its deadline, then its pages come back. Decode cuts the
    re-run's rows into pages of 8 tokens, prefill into 16."""
    if backend == "nixl":
        pytest.importorskip("nixl._api", reason="NIXL is installed by launch/setup_env.sh")
    cluster = Cluster.local(tmp_path, *QUIET, "kv_timeout_s=2", f"kvcache.transfer={backend}",
                            "decode:kvcache.block_size=8", "decode:kvcache.num_blocks=512",
                            "prefill:testing.drop_kv_transfers=1", PREFILL_RANKS="1", DECODE_RANKS="2")
    try:
        started = time.monotonic()
        status, answer = run(complete(cluster.url, greedy(PROMPT, 8)))
        assert status == 200, answer
        assert answer["choices"][0]["token_ids"] == expected(PROMPT, 8)
        assert set(cluster.wait_idle().values()) == {0}  # the dropped one's pages are free on both sides
        if backend == "nixl":  # not before the reservation's deadline plus the fence (2 s each)
            assert time.monotonic() - started >= 4
        metrics = cluster.metrics()
        assert metrics["moe_pd_retries_total"] == 1
        # the dropped one timed out on prefill, or was cancelled when decode's reservation timed out first
        assert transfers(metrics, "timed_out", backend) + transfers(metrics, "cancelled", backend) == 1
        assert transfers(metrics, "done", backend) == 1  # the re-run
    finally:
        cluster.stop()


def test_a_killed_decode_rank_migrates_its_requests_and_the_router_carries_on(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        prefill = cluster.instance("prefill", 1, *QUIET)
        doomed = cluster.instance("decode", 2, *QUIET)
        spare = cluster.instance("decode", 1, *QUIET, "kvcache.num_blocks=64")  # fewer free pages: picked second
        cluster.router(f"prefill=[{prefill}]", f"decode=[{doomed},{spare}]", "heartbeat_timeout_s=3",
                       "log_level=WARNING")
        victim = next(i for i in cluster.health()[1]["instances"] if i["name"] == doomed)["ranks"][1]["pid"]

        async def long_request_then_kill():
            import asyncio

            task = asyncio.create_task(stream(cluster.url, greedy([BOS, 7, 7, 7], 300)))
            await asyncio.sleep(1.0)  # decoding on the doomed instance by now
            os.kill(victim, signal.SIGKILL)
            return await task

        started = time.monotonic()
        events = run(long_request_then_kill(), timeout=90)
        # migrated to the spare with the tokens already streamed: the stream just continues to its end
        assert all("error" not in e for e in events), events[-1]
        assert sum(len(e["choices"][0]["token_ids"]) for e in events) == 300
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - started < 60
        assert cluster.metrics()["moe_pd_retries_total"] == 1

        status, body = cluster.health()
        assert status == 200 and body["status"] == "degraded"
        assert {i["name"]: i["up"] for i in body["instances"]} == {prefill: True, doomed: False, spare: True}

        status, answer = run(complete(cluster.url, greedy(PROMPT, 6)))  # served by the spare instance
        assert status == 200 and answer["choices"][0]["token_ids"] == expected(PROMPT, 6)
        assert cluster.wait_idle() == {prefill: 0, spare: 0}
        assert cluster.metrics()['moe_pd_instance_up{instance="%s",role="decode"}' % doomed] == 0
    finally:
        cluster.stop()


def test_a_dead_prefill_instance_is_routed_around_and_its_request_rerun(tmp_path):
    """The prefill instance a request is sent to is dead but not yet marked down: when its heartbeats stop,
    the router aborts the decode reservation and re-runs the request once on the other prefill instance. On
    NIXL (the CPU default) nothing proves the dead instance never wrote, so the reservation's pages come back
    after its deadline plus the fence (a KV timeout each: 8 s here)."""
    cluster = Cluster(tmp_path)
    try:
        first = cluster.instance("prefill", 1, *QUIET, "kv_timeout_s=8")
        second = cluster.instance("prefill", 1, *QUIET, "kv_timeout_s=8")
        decode = cluster.instance("decode", 1, *QUIET, "kv_timeout_s=8")
        cluster.router(f"prefill=[{first},{second}]", f"decode=[{decode}]", "heartbeat_timeout_s=3",
                       "log_level=WARNING")
        # Equal queues and no cached prefix: the router picks the smaller address (pick_prefill_instance).
        doomed, spare = sorted([first, second])
        victim = next(i for i in cluster.health()[1]["instances"] if i["name"] == doomed)["ranks"][0]["pid"]
        os.kill(victim, signal.SIGKILL)

        started = time.monotonic()
        status, answer = run(complete(cluster.url, greedy(PROMPT, 6)), timeout=60)
        assert status == 200, answer
        assert answer["choices"][0]["token_ids"] == expected(PROMPT, 6)
        assert time.monotonic() - started < 30
        metrics = cluster.metrics()
        assert metrics["moe_pd_retries_total"] == 1
        assert metrics['moe_pd_instance_up{instance="%s",role="prefill"}' % doomed] == 0
        status, body = cluster.health()
        assert status == 200 and body["status"] == "degraded"
        assert cluster.wait_idle(timeout=40) == {spare: 0, decode: 0}  # the first attempt's reservation is freed
    finally:
        cluster.stop()
