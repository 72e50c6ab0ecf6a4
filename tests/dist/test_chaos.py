"""Chaos against one launch/local.sh PD cluster (loopback, fresh ports, bounded in requests and time): hostile
inputs, clients that disconnect, a killed decode rank and a killed prefill rank under load, a frozen rank
(SIGSTOP past the heartbeat timeout, then SIGCONT), and a drain under load. Each case ends by checking through
/metrics that no page, batch slot, reservation, transfer or router attempt is left, and the cluster serves.

One cluster is shared by the cases (start-up is the expensive part), in this order; the drain ends it."""

import asyncio
import os
import signal
import subprocess
import time

import aiohttp
import pytest

from helpers.cluster import Cluster, run
from helpers.hostile import ACCEPTED, HOSTILE, check_error, send

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

OVERRIDES = ["kvcache.block_size=16", "kvcache.num_blocks=128", "runtime.log_level=WARNING", "kv_timeout_s=10",
             "router:heartbeat_timeout_s=3", "router:queue_timeout_s=120", "router:log_level=WARNING"]
LOAD = 6
"""Concurrent streams during a fault."""
N = 300
"""Tokens each of them asks for (long enough to be decoding when the fault comes)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.local(tmp_path_factory.mktemp("chaos"), *OVERRIDES, PREFILL_RANKS="1", DECODE_RANKS="2",
                      DRAIN_TIMEOUT="20")
    yield c
    c.stop()


def gauges(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def assert_clean(cluster: Cluster, timeout: float = 60) -> None:
    """Every instance up and, through /metrics, nothing held anywhere (settled for longer than a heartbeat)."""
    names = ["moe_pd_kv_pages_used", "moe_pd_running_requests", "moe_pd_waiting_requests",
             "moe_pd_kv_reserved_requests", "moe_pd_kv_requests_in_transfer", "moe_pd_router_waiting_requests",
             "moe_pd_router_live_attempts"]
    deadline, clean_since, held = time.monotonic() + timeout, None, {}
    while time.monotonic() < deadline:
        metrics = cluster.metrics()
        held = {n: gauges(metrics, n) for n in names if gauges(metrics, n)}
        up = cluster.health()[1]["status"] == "ok"
        clean_since = (clean_since or time.monotonic()) if up and not held else None
        if clean_since and time.monotonic() - clean_since > 1.5:
            return
        time.sleep(0.2)
    raise AssertionError(f"left behind: {held}; health: {cluster.health()}\n{cluster.logs()}")


def body(i: int, n: int = 40) -> dict:
    return {"prompt": f"Request {i}: tell me a long story", "max_tokens": n, "temperature": 0, "ignore_eos": True}


async def stream_tokens(url: str, req: dict, progress: list | None = None) -> tuple[int, str | None, dict | None]:
    """(tokens streamed, the last finish_reason, an error event) of one streaming completion; `progress`
    (a one-item list) counts the tokens as they come."""
    count, reason, error = 0, None, None
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json={**req, "stream": True, "return_token_ids": True,
                                                         "stream_options": {"include_usage": True}}) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                line = line.decode().strip()
                if not line.startswith("data: {"):
                    continue
                import json
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                for choice in event.get("choices", []):
                    count += len(choice.get("token_ids", []))
                    reason = choice["finish_reason"] or reason
                if progress is not None:
                    progress[0] = count
    return count, reason, error


def pid_of(cluster: Cluster, role: str, rank: int) -> int:
    inst = next(i for i in cluster.health()[1]["instances"] if i["role"] == role)
    return next(r["pid"] for r in inst["ranks"] if r["rank"] == rank)


async def under_load(cluster: Cluster, fault, n: int = N):
    """LOAD streams; `fault()` once every stream is decoding (has a few tokens); every stream's outcome."""
    progress = [[0] for _ in range(LOAD)]
    tasks = [asyncio.create_task(stream_tokens(cluster.url, body(i, n), progress[i])) for i in range(LOAD)]
    for _ in range(200):
        if all(p[0] >= 3 for p in progress):
            break
        await asyncio.sleep(0.05)
    assert all(p[0] < n for p in progress), "the load ended before the fault"
    fault()
    return await asyncio.gather(*tasks)


def test_hostile_inputs_get_json_errors_through_the_cluster(cluster):
    for case in HOSTILE:
        check_error(case, *run(send(cluster.url, case[1], case[2])))
    for name, path, req in ACCEPTED:
        status, got, _ = run(send(cluster.url, path, req))
        assert status == 200, (name, got)
    assert_clean(cluster)


def test_disconnected_clients_are_aborted_everywhere(cluster):
    async def leave(streaming: bool):
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(cluster.url + "/v1/completions", json={**body(0, 900), "stream": streaming},
                                  timeout=aiohttp.ClientTimeout(total=1.5)) as r:
                    await r.content.readline()
            except asyncio.TimeoutError:
                pass

    async def both():
        await asyncio.gather(*(leave(i % 2 == 0) for i in range(4)))

    before = cluster.metrics().get('moe_pd_requests_total{outcome="aborted"}', 0)
    run(both())
    assert_clean(cluster, timeout=30)  # long before 900 tokens each could have been generated
    assert cluster.metrics()['moe_pd_requests_total{outcome="aborted"}'] - before == 4


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_a_killed_rank_under_load_loses_no_request_and_the_cluster_heals(cluster, role):
    victim = pid_of(cluster, role, 1 if role == "decode" else 0)
    started = time.monotonic()
    results = run(under_load(cluster, lambda: os.kill(victim, signal.SIGKILL)), timeout=240)
    for count, reason, error in results:  # migrated: every stream continued to its full length
        assert error is None and (count, reason) == (N, "length"), results
    assert_clean(cluster, timeout=180)  # restarted by launch/supervise.sh, re-registered with the router
    assert time.monotonic() - started < 200
    assert pid_of(cluster, role, 0) != victim
    assert cluster.metrics()["moe_pd_retries_total"] >= 1


def test_a_frozen_rank_is_routed_around_and_serves_again_after_sigcont(cluster):
    victim = pid_of(cluster, "decode", 0)

    async def go():
        frozen = asyncio.Event()

        def freeze():
            os.kill(victim, signal.SIGSTOP)
            frozen.set()

        outcome = asyncio.create_task(under_load(cluster, freeze))
        await frozen.wait()
        await asyncio.sleep(6)  # past the 3 s heartbeat timeout: marked down, its requests migrate and wait
        assert cluster.health()[1]["status"] != "ok"
        os.kill(victim, signal.SIGCONT)
        return await outcome

    results = run(go(), timeout=240)
    for count, reason, error in results:
        assert error is None and (count, reason) == (N, "length"), results
    assert_clean(cluster, timeout=120)
    assert pid_of(cluster, "decode", 0) == victim  # the same process serves again


def test_sigterm_under_load_drains_and_leaves_nothing_running(cluster):
    pids = [r["pid"] for i in cluster.health()[1]["instances"] for r in i["ranks"]]
    local = cluster.local.proc
    descendants = subprocess.run(["pgrep", "-g", str(local.pid)], capture_output=True, text=True).stdout.split()

    async def go():
        progress = [[0] for _ in range(LOAD)]
        tasks = [asyncio.create_task(stream_tokens(cluster.url, body(i, N), progress[i])) for i in range(LOAD)]
        while not all(p[0] >= 3 for p in progress):
            await asyncio.sleep(0.05)
        local.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        late = await send(cluster.url, "/v1/completions", body(99, 4))
        return await asyncio.gather(*tasks), late

    results, late = run(go(), timeout=120)
    for count, reason, error in results:  # in flight when SIGTERM came: finished
        assert error is None and (count, reason) == (N, "length"), results
    assert late[0] == 503 and late[1]["error"]["type"] == "server_error"
    local.wait(60)
    for pid in pids + [int(p) for p in descendants]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
