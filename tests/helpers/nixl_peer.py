"""A NIXL rank in a child process, driven over a pipe: the other rank of the two-process NIXL tests.

The child owns a CPU KV pool and one agent with both ends of the transfer contract and the reader over it,
and answers (method, args) calls; `poll_for` pumps them and returns what ended as plain tuples. The parent
stops it by its own pid.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import torch

from moe_pd.kvcache.transfer.nixl_agent import UCX_ONE_HOST_CPU


def summary(sender=None, receiver=None, reader=None, pages: dict | None = None) -> list[tuple]:
    out = []
    if sender is not None:
        out += [("sent", a.request_id, a.state.value, a.detail) for a in sender.poll()]
    if receiver is not None:
        out += [("arrival", a.request_id, a.state.value, a.detail, a.quiet,
                 None if a.header is None else (a.header.num_tokens, a.header.first_token))
                for a in receiver.poll((pages or {}).get)]
    if reader is not None:
        out += [("read", a.request_id, a.state.value, a.detail) for a in reader.poll()]
        out += [("served", tid) for tid in reader.served()]
    return out


def _serve(conn, shape: tuple[int, ...], dtype: torch.dtype, fence_s: float) -> None:
    from moe_pd.kvcache.transfer.nixl_agent import NixlAgent
    from moe_pd.kvcache.transfer.nixl_transport import NixlReader, NixlReceiver, NixlSender

    pool = torch.zeros(shape, dtype=dtype)
    agent = NixlAgent("peer", pool, UCX_ONE_HOST_CPU)
    sender, receiver, reader = NixlSender(agent), NixlReceiver(agent, fence_s), NixlReader(agent)

    def poll_for(seconds: float, until: int = 1, pages: dict | None = None) -> list[tuple]:
        seen, deadline = [], time.monotonic() + seconds
        while len(seen) < until and time.monotonic() < deadline:
            seen += summary(sender, receiver, reader, pages)
            time.sleep(0.005)
        return seen

    def set_pages(pages, values):
        pool[:, pages] = values

    calls = {
        "metadata": agent.metadata, "target": receiver.target,
        "send": lambda target, pages, header, timeout: sender.send(target, pool, pages, header,
                                                                   time.monotonic() + timeout),
        "cancel": sender.cancel, "read": reader.read, "poll_for": poll_for,
        "pages": lambda pages: pool[:, pages].clone(), "set_pages": set_pages,
        "counters": lambda: dict(agent.counters),
    }
    conn.send(("ready", agent.name))
    while True:
        method, args = conn.recv()
        if method == "exit":
            agent.close()
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
