"""A NIXL engine in a child process, driven over a pipe: the other rank of the two-process NIXL tests.

The child owns a CPU KV pool and answers (method, args) calls; `poll_for` pumps its engine and returns what
ended as plain tuples. The parent stops it by its own pid.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import torch

from moe_pd.kvcache.transfer.nixl_agent import UCX_ONE_HOST_CPU


def _summary(progress) -> list[tuple]:
    out = [("write", w.transfer_id, w.state.value, w.detail) for w in progress.writes]
    out += [("arrival", a.transfer_id, a.state.value, a.detail, a.num_tokens, a.payload) for a in progress.arrivals]
    out += [("reclaimed", a.transfer_id, a.state.value) for a in progress.reclaimed]
    return out


def _serve(conn, shape: tuple[int, ...], dtype: torch.dtype, fence_s: float) -> None:
    from moe_pd.kvcache.transfer.nixl_engine import NixlEngine

    pool = torch.zeros(shape, dtype=dtype)
    engine = NixlEngine("peer", pool, UCX_ONE_HOST_CPU, fence_s=fence_s)

    def poll_for(seconds: float, until: int = 1) -> list[tuple]:
        seen, deadline = [], time.monotonic() + seconds
        while len(seen) < until and time.monotonic() < deadline:
            seen += _summary(engine.poll())
            time.sleep(0.005)
        return seen

    def set_pages(pages, values):
        pool[:, pages] = values

    calls = {
        "metadata": engine.metadata, "add_peer": engine.add_peer, "expect": lambda *a: engine.expect(*a).state.value,
        "cancel_arrival": lambda tid: engine.cancel_arrival(tid).state.value,
        "write": lambda tid, peer, src, dst, n, payload, timeout, not_after_in=None: engine.write(
            tid, peer, src, dst, n, payload, timeout,
            None if not_after_in is None else time.monotonic() + not_after_in).state.value,
        "poll_for": poll_for, "pages": lambda pages: pool[:, pages].clone(), "set_pages": set_pages,
        "counters": lambda: dict(engine.counters),
    }
    conn.send(("ready", engine.name))
    while True:
        method, args = conn.recv()
        if method == "exit":
            engine.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", calls[method](*args)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Peer:
    """The parent's handle on the child: `call` waits at most `timeout` seconds for each answer."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, fence_s: float = 60.0,
                 start_timeout: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, shape, dtype, fence_s), daemon=True)
        self.process.start()
        self.name = self._answer(start_timeout)

    def _answer(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"NIXL peer (pid {self.process.pid}) did not answer in {timeout} s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def call(self, method: str, *args, timeout: float = 20.0):
        self.conn.send((method, args))
        return self._answer(timeout)

    def kill(self) -> None:
        """Stops the child at once by its pid (a peer that dies mid-transfer)."""
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("exit", timeout=10)
            except (TimeoutError, OSError, EOFError):
                pass
        self.kill()
