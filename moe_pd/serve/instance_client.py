"""The router's connection to one instance's leader: sends protocol messages, hands every answer to the
router's request table, keeps the instance's latest Status (its heartbeat) and says when it went down."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from moe_pd.serve import protocol as p

log = logging.getLogger("moe_pd.serve.router")


class InstanceClient:
    def __init__(self, address: str, role: str, context: zmq.asyncio.Context, timeout_s: float,
                 on_message: Callable[["InstanceClient", p.LeaderMessage], None],
                 on_down: Callable[["InstanceClient"], None]) -> None:
        """`on_message(instance, msg)`: every answer but Status; `on_down(instance)`: it missed its heartbeats."""
        self.address, self.role, self.timeout_s = address, role, timeout_s
        self.on_message, self.on_down = on_message, on_down
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.status: p.Status | None = None
        self.last_seen: float | None = None
        self.status_at = 0.0
        """When its latest status came."""
        self.refused_at = 0.0
        """When it last refused a reservation for room (the router waits for a newer status)."""
        self._was_up = False
        self._version_warned = False

    @property
    def up(self) -> bool:
        """Answering heartbeats, with its ranks reporting."""
        return (self.last_seen is not None and time.monotonic() - self.last_seen < self.timeout_s
                and bool(self.ranks))

    @property
    def ranks(self) -> list[p.RankLoad]:
        return self.status.ranks if self.status is not None else []

    @property
    def eplb(self) -> dict | None:
        """The instance's EPLB figures from its latest status (None: EPLB off)."""
        eplb = self.status.eplb if self.status is not None else None
        return msgspec.to_builtins(eplb) if eplb is not None else None

    @property
    def block_size(self) -> int:
        return self.status.block_size if self.status is not None else 64

    @property
    def free_pages(self) -> int:
        return sum(r.kv_total - r.kv_used for r in self.ranks)

    @property
    def rank_room(self) -> int:
        """Free KV pages on its emptiest rank (a request's pages are all on one rank)."""
        return max((r.kv_total - r.kv_used for r in self.ranks), default=0)

    @property
    def draining(self) -> bool:
        return self.status is not None and self.status.draining

    @property
    def queued_tokens(self) -> int:
        return sum(r.queued_tokens for r in self.ranks)

    def send(self, msg: p.Message) -> None:
        """Never blocks: toward an instance that is down, messages queue up to the socket's limit, then
        are dropped (the instance then has nothing of ours to act on)."""
        try:
            self.socket.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("%s instance %s: send queue full, dropped %s", self.role, self.address, type(msg).__name__)

    async def receive(self) -> None:
        while True:
            msg = p.decode_leader_message(await self.socket.recv(), f"{self.role} instance {self.address}")
            if msg is None:
                continue
            if isinstance(msg, p.Status):
                self._status(msg)
                continue
            self.last_seen = time.monotonic()
            self.on_message(self, msg)

    def _status(self, status: p.Status) -> None:
        if status.version != p.PROTOCOL_VERSION:
            if not self._version_warned:
                log.error("%s instance %s speaks protocol version %d, this router %d: not using it", self.role,
                          self.address, status.version, p.PROTOCOL_VERSION)
                self._version_warned = True
            return
        self.status, self.last_seen = status, time.monotonic()
        self.status_at = self.last_seen
        if self.up and not self._was_up:
            log.info("%s instance %s is up (%d ranks)", self.role, self.address, len(self.ranks))
            self._was_up = True

    async def watch(self) -> None:
        """Says hello until the instance answers (again), and reports it down once it falls silent."""
        while True:
            if not self.up:
                if self._was_up:
                    self._was_up = False
                    log.error("%s instance %s missed its heartbeats for %.1f s: marked down", self.role,
                              self.address, self.timeout_s)
                    self.on_down(self)
                self.send(p.Hello(p.PROTOCOL_VERSION))
            await asyncio.sleep(min(0.5, self.timeout_s / 4))

    def describe(self) -> dict:
        """Its latest status; a down instance shows no ranks (its last numbers are not its state)."""
        up = self.up
        return {"name": self.address, "role": self.role, "up": up, "draining": up and self.draining,
                "ranks": msgspec.to_builtins(self.ranks) if up else []}
