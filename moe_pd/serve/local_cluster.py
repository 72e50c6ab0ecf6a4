"""Local clusters: launch/local.sh started on fresh ports, and the wait for a router's /health to say ok.

launch/local.sh waits for its components with `python -m moe_pd.serve.local_cluster wait URL TIMEOUT [PID ...]`;
the cluster tests and perf/bench_serving.py start and stop local.sh through LocalCluster (which needs a source
checkout: launch/ is not part of the wheel).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

LOCAL_SH = Path(__file__).resolve().parents[2] / "launch" / "local.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str, timeout: float = 5) -> tuple[int, dict]:
    """(HTTP status, body) of GET url/health; a 503 (degraded or unavailable) is an answer too."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def wait_healthy(url: str, timeout: float, exited: Callable[[], str | None] = lambda: None,
                 poll_s: float = 0.3) -> None:
    """Returns once url/health says ok. Raises RuntimeError as soon as `exited()` names a component that
    ended (its return value is the message), or when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if why := exited():
            raise RuntimeError(why)
        try:
            if health(url, timeout=2)[1].get("status") == "ok":
                return
        except (OSError, ValueError):
            pass  # not listening yet, or answering with something that is not JSON
        time.sleep(poll_s)
    raise RuntimeError(f"{url} was not healthy after {timeout:.0f} s")


class LocalCluster:
    """launch/local.sh in its own session, every port a fresh one (clusters never collide). `env` sets
    local.sh's other knobs (PREFILL_RANKS, DECODE_RANKS, READY_TIMEOUT, ...); its output goes to
    run_dir/local.out and the components' logs next to it."""

    def __init__(self, run_dir: Path, overrides: Sequence[str] = (), mode: str = "pd",
                 env: dict[str, str] | None = None) -> None:
        if not LOCAL_SH.is_file():
            raise FileNotFoundError(f"{LOCAL_SH} not found: local clusters start from a source checkout")
        run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = run_dir / "local.out"
        full_env = {**os.environ, "PYTHON": sys.executable, "MODE": mode, "ROUTER_PORT": str(port),
                    "PREFILL_PORT": str(free_port()), "DECODE_PORT": str(free_port()), "RUN_DIR": str(run_dir),
                    **(env or {})}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(["bash", str(LOCAL_SH), *overrides], cwd=LOCAL_SH.parents[1], env=full_env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def exited(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"launch/local.sh exited ({self.proc.returncode}) during start-up; see {self.log_path}"

    def wait(self, timeout: float = 300) -> None:
        wait_healthy(self.url, timeout, self.exited)

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to local.sh (its trap stops the ranks first, then torchrun and the router); whatever is
        left after `grace` seconds is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _pid_gone(pids: Sequence[int]) -> str | None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"a component exited during start-up (pid {pid})"
    return None


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] != "wait":
        print("usage: python -m moe_pd.serve.local_cluster wait URL TIMEOUT_S [PID ...]", file=sys.stderr)
        return 2
    url, timeout, pids = argv[1], float(argv[2]) if len(argv) > 2 else 300.0, [int(p) for p in argv[3:]]
    try:
        wait_healthy(url, timeout, lambda: _pid_gone(pids), poll_s=0.5)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
