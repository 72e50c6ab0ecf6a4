"""PD clusters on localhost for tests: launch/local.sh (moe_pd.serve.local_cluster), or instances and a router
started one by one.

Every port is a fresh free one, so clusters never collide; stopping sends SIGTERM to the ranks first and
then to the launchers, and kills whatever is left after a grace period."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from moe_pd.serve.local_cluster import LocalCluster, free_port, health, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


class Cluster:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: list[subprocess.Popen] = []
        self.local: LocalCluster | None = None
        """launch/local.sh, when the cluster was started through it (Cluster.local)."""
        self.url = ""

    # starting -------------------------------------------------------------------------------------------
    @classmethod
    def local(cls, run_dir: Path, *overrides: str, mode: str = "pd", **env: str) -> "Cluster":
        """launch/local.sh, as a user runs it."""
        cluster = cls(run_dir)
        cluster.local = LocalCluster(run_dir, overrides, mode, env={**_env(), "READY_TIMEOUT": "150", **env})
        cluster.procs.append(cluster.local.proc)
        cluster.url = cluster.local.url
        try:
            cluster.wait_ready()
        except BaseException:
            cluster.stop()  # never leave a half-started cluster running
            raise
        return cluster

    def instance(self, role: str, ranks: int, *overrides: str) -> str:
        """One instance through launch/_instance.sh; returns its control address."""
        port = free_port()
        name = f"{role}-{port}"
        env = {**_env(), "NPROC_PER_NODE": str(ranks), "RUN_DIR": str(self.run_dir / name)}
        log = open(self.run_dir / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(["bash", str(ROOT / "launch/_instance.sh"), role, f"port={port}",
                                            "runtime.log_level=WARNING", *overrides], cwd=ROOT, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return f"tcp://127.0.0.1:{port}"

    def router(self, *overrides: str) -> None:
        port = free_port()
        log = open(self.run_dir / "router.log", "w")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "moe_pd.serve.router", f"hydra.run.dir={self.run_dir / 'router'}", f"port={port}",
             *overrides], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self.url = f"http://127.0.0.1:{port}"
        self.wait_ready()

    def wait_ready(self, timeout: float = 150) -> None:
        def exited() -> str | None:
            return "a cluster process exited during start-up" if any(p.poll() is not None for p in self.procs) else None

        try:
            wait_healthy(self.url, timeout, exited)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; logs:\n{self.logs()}") from None

    # looking ----------------------------------------------------------------------------------------------
    def health(self) -> tuple[int, dict]:
        return health(self.url)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}

    def pages_used(self) -> dict[str, int]:
        """instance -> KV pages in use, summed over its ranks (as its latest heartbeat says)."""
        return {i["name"]: sum(r["kv_used"] for r in i["ranks"]) for i in self.health()[1]["instances"] if i["up"]}

    def wait_idle(self, timeout: float = 30, settle: float = 1.5) -> dict[str, int]:
        """Waits until every live instance has held no pages and no requests for `settle` seconds (longer
        than a heartbeat, so a stale status cannot pass); returns the last page counts."""
        deadline = time.monotonic() + timeout
        idle_since = None
        while time.monotonic() < deadline:
            body = self.health()[1]
            ranks = [r for i in body["instances"] if i["up"] for r in i["ranks"]]
            busy = sum(r["kv_used"] + r["running"] + r["waiting"] + r["in_transfer"] for r in ranks)
            idle_since = (idle_since or time.monotonic()) if busy == 0 else None
            if idle_since is not None and time.monotonic() - idle_since >= settle:
                break
            time.sleep(0.1)
        return self.pages_used()

    def wait_metric(self, name: str, at_least: float, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while (value := self.metrics().get(name, 0.0)) < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
        return value

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.run_dir.glob("*.log"))
                         if p.is_file()) + "\n".join(p.read_text()[-2000:] for p in self.run_dir.glob("local.out"))

    # stopping ---------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """local.sh stops through LocalCluster.stop; instances and routers started one by one get SIGTERM to
        their process groups, then SIGKILL what is left after 20 s."""
        if self.local is not None:
            self.local.stop(grace=20)
        started = [proc for proc in self.procs if self.local is None or proc is not self.local.proc]
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def transfers(metrics: dict[str, float], state: str, backend: str = "") -> float:
    """KV transfers the prefill instances finished in `state` (over `backend`, if given), as the router's
    /metrics says."""
    return sum(v for k, v in metrics.items() if k.startswith("moe_pd_kv_transfers{") and f'state="{state}"' in k
               and (not backend or f'backend="{backend}"' in k))


# clients -------------------------------------------------------------------------------------------------
async def complete(url: str, body: dict, path: str = "/v1/completions") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body) as r:
            return r.status, await r.json()


async def stream(url: str, body: dict, path: str = "/v1/completions") -> list[dict]:
    """The SSE events of a streaming request (an error event included), without the final [DONE]."""
    out = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json={**body, "stream": True}) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    out.append(json.loads(line[6:]))
    return out


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))
