"""An instance's leader (rank 0): the routers' ZeroMQ socket, which DP rank serves each request, and the
events sent back to the router that asked.

Prefill balances uncached prompt tokens and attention work, preferring the rank that caches the prompt's
prefix (as its ranks report what their caches stored and evicted: moe_pd.serve.cache_index); decode and
colocated balance KV usage and running requests (DeepSeek's load balancers, see moe_pd.serve.balancer).
The ranks' cache events also go on to the routers (Cached), so they route by what the instance holds.
The leader's record of a request is a Route (which router, which rank); the rank
that runs it keeps the request's own record (moe_pd.engine.core.request).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq

from moe_pd.config.serve import ServiceConfig
from moe_pd.engine.core.request import capacity_problem, pages_needed
from moe_pd.serve import protocol as p
from moe_pd.serve.balancer import DecodeRankLoad, PrefillRankLoad, assign_prefill, pick_decode_rank
from moe_pd.serve.cache_index import CacheIndex, prompt_keys

log = logging.getLogger(__name__)

ACCEPTS = {"prefill": p.Prefill, "decode": p.Reserve, "colocated": p.Generate}
"""The request message each role takes."""


class RouteState(enum.Enum):
    DEFERRED = "deferred"
    """Arrived before the ranks' first report: assigned at the next iteration."""
    ASSIGNED = "assigned"
    """A rank runs it; its events go to the router that sent it."""


@dataclass(eq=False)
class Route:
    """The leader's record of one request (attempt): who asked, which rank runs it."""

    rid: str
    router: bytes
    """The router's ZeroMQ identity."""
    request: p.Command
    state: RouteState = RouteState.DEFERRED
    rank: int = -1


class Routes:
    """Every request this leader has taken and not finished, by id: the one place to ask where it runs."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def open(self, router: bytes, request: p.Command) -> Route | None:
        """A new route; None when the id is already live (a duplicate is refused, never run twice)."""
        if request.rid in self._routes:
            return None
        route = self._routes[request.rid] = Route(request.rid, router, request)
        return route

    def assign(self, route: Route, rank: int) -> None:
        route.state, route.rank = RouteState.ASSIGNED, rank

    def close(self, rid: str) -> Route | None:
        return self._routes.pop(rid, None)

    def get(self, rid: str) -> Route | None:
        return self._routes.get(rid)

    def deferred(self) -> list[Route]:
        return [r for r in self._routes.values() if r.state is RouteState.DEFERRED]

    def __len__(self) -> int:
        return len(self._routes)


class Leader:
    def __init__(self, cfg: ServiceConfig, world_size: int, name: str, block_size: int, max_context: int,
                 cache_root: bytes = b"", tier_domains: dict[str, str] | None = None) -> None:
        """`cache_root`: the model identity digest its page keys chain from; `tier_domains`: where the node's
        tiers this instance uses live (TierManager.domains)."""
        self.cfg, self.world_size, self.name = cfg, world_size, name
        self.block_size, self.max_context = block_size, max_context
        self.cache_root, self.tier_domains = cache_root, {k: v for k, v in (tier_domains or {}).items() if v}
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://{cfg.host}:{cfg.port}")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.routers: set[bytes] = set()
        self.routes = Routes()
        self.loads: list[p.RankLoad] = []
        self.eplb_metrics: Callable[[], dict] | None = None
        """EplbManager.metrics of this rank, added to every status for the routers' /metrics."""
        self.cache = CacheIndex()
        """Owners: a rank (its device pages), "dram" and "disk" (the node's tiers, as this instance wrote them)."""
        self._last_beat = 0.0
        self.drain_started: float | None = None
        """When a rank was asked to stop: the instance finishes what it holds, routers send it nothing new."""

    @property
    def draining(self) -> bool:
        return self.drain_started is not None

    def drained(self) -> bool:
        """Called every iteration while draining: True once nothing is left (no route, no request on any rank)
        and the routers had two heartbeats to learn of the drain, or once `drain_timeout_s` passed."""
        now = time.monotonic()
        if self.drain_started is None:
            self.drain_started = now
            self._last_beat = 0.0  # tell the routers at once
            log.info("%s: draining (%d request(s) held, up to %.0f s)", self.name, len(self.routes),
                     self.cfg.drain_timeout_s)
        elapsed = now - self.drain_started
        holding = len(self.routes) or any(load.running or load.waiting or load.in_transfer for load in self.loads)
        if elapsed > self.cfg.drain_timeout_s:
            if holding:
                log.warning("%s: drain timeout with %d request(s) still held", self.name, len(self.routes))
            return True
        return not holding and elapsed >= 2 * self.cfg.heartbeat_s

    # from the routers ---------------------------------------------------------------------------------------
    def collect(self, wait_ms: float) -> dict[int, list[p.Command]]:
        """Reads the routers' messages (waiting up to `wait_ms` for the first) -> commands per rank."""
        commands: dict[int, list[p.Command]] = {}
        new: list[Route] = self.routes.deferred()
        timeout = int(wait_ms)
        while self.socket.poll(timeout, zmq.POLLIN):
            timeout = 0
            identity, raw = self.socket.recv_multipart()
            msg = p.decode_router_message(raw)
            if isinstance(msg, p.Error):  # a broken request: fail it alone
                self._send(identity, msg)
            elif isinstance(msg, p.Hello):
                self._hello(identity, msg)
            elif isinstance(msg, p.Abort):
                route = self.routes.close(msg.rid)
                if route is not None and route.state is RouteState.ASSIGNED:
                    commands.setdefault(route.rank, []).append(msg)
            elif msg is not None:
                self.routers.add(identity)
                if not isinstance(msg, ACCEPTS[self.cfg.role]):
                    self._send(identity, p.Error(msg.rid, f"a {self.cfg.role} instance does not take "
                                                          f"'{type(msg).__name__.lower()}' requests", status=400))
                elif (route := self.routes.open(identity, msg)) is None:
                    self._send(identity, p.Error(msg.rid, f"request id {msg.rid} is already running here",
                                                 status=400))
                else:
                    new.append(route)
        if new and self.loads:  # before the ranks' first report they stay deferred
            self._assign(new, commands)
        return commands

    def _hello(self, identity: bytes, hello: p.Hello) -> None:
        if hello.version != p.PROTOCOL_VERSION:
            log.warning("refused a router speaking protocol version %d (this instance speaks %d)", hello.version,
                        p.PROTOCOL_VERSION)
            self.routers.discard(identity)
        else:
            self.routers.add(identity)
        self._send(identity, self.status())
        if identity in self.routers and self.cache_root:
            self._send_snapshot(identity)

    def _assign(self, new: list[Route], commands: dict[int, list[p.Command]]) -> None:
        if self.cfg.role == "prefill":
            ranks = [PrefillRankLoad(load.rank, load.queued_tokens) for load in self.loads]
            chosen = assign_prefill([(r.rid, len(r.request.prompt), self._cached_per_rank(r.request.prompt))
                                     for r in new], ranks)
        else:
            chosen = self._pick_decode_ranks(new)
        for route in new:
            rank = chosen.get(route.rid)
            if rank == -1:  # refused in _pick_decode_ranks
                continue
            if rank is None:
                self._refuse(route, p.Error(route.rid, f"{self.name}: no rank has free KV pages and a free slot",
                                            retry=True, status=503))
                continue
            self.routes.assign(route, rank)
            commands.setdefault(rank, []).append(route.request)

    def _pick_decode_ranks(self, new: list[Route]) -> dict[str, int]:
        chosen = {}
        ranks = [DecodeRankLoad(load.rank, load.kv_used, load.kv_total, load.running + load.waiting, load.max_running)
                 for load in self.loads]
        largest = max(load.kv_total for load in self.loads)
        for route in new:
            msg = route.request
            if problem := capacity_problem(len(msg.prompt), msg.max_tokens, self.block_size, self.max_context, largest):
                self._refuse(route, p.Error(route.rid, f"the request {problem} (the largest of a {self.cfg.role} "
                                                       "rank)", retry=False, status=400))
                chosen[route.rid] = -1
                continue
            need = pages_needed(len(msg.prompt), msg.max_tokens, self.block_size, self.max_context)
            excluded = set(getattr(msg, "exclude", ()))
            allowed = [r for r, load in zip(ranks, self.loads) if load.address not in excluded] or ranks
            rank = pick_decode_rank(allowed, need)
            if rank is not None:
                ranks[rank].kv_pages_used += need
                ranks[rank].running += 1
                chosen[route.rid] = rank
        return chosen

    def _cached_per_rank(self, prompt: list[int]) -> dict[int, int]:
        """rank -> prompt tokens its device pages or the node's tiers hold (whole pages)."""
        if not self.cache_root:
            return {}
        keys = prompt_keys(self.cache_root, prompt, self.block_size)
        return {rank: self.cache.run(keys, (rank, "dram", "disk")) * self.block_size
                for rank in range(self.world_size)}

    # cache events -------------------------------------------------------------------------------------------
    def observe_cache(self, reports: list[p.RankReport]) -> None:
        """The ranks' cache events: into this leader's index, and on to every router as one Cached."""
        merged: dict[str, p.CacheEvents] = {}
        for report in reports:
            for ev in report.cache:
                self.cache.apply(report.rank if ev.tier == "device" else ev.tier, ev.stored, ev.removed,
                                 counted=ev.tier == "device")
                out = merged.setdefault(ev.tier, p.CacheEvents(ev.tier, [], []))
                out.stored += ev.stored
                out.removed += ev.removed
        if merged and self.routers:
            raw = p.encode(p.Cached(list(merged.values())))
            for identity in self.routers:
                self.socket.send_multipart([identity, raw])

    def _send_snapshot(self, identity: bytes, chunk: int = 1 << 16) -> None:
        """Everything the instance's caches hold, in chunks; the first replaces what the router knew."""
        owners = [(rank, "device") for rank in range(self.world_size)] + [(t, t) for t in self.tier_domains]
        events = [(tier, key) for owner, tier in owners for key in self.cache.keys(owner)]
        for start in range(0, max(len(events), 1), chunk):
            part = events[start : start + chunk]
            by_tier: dict[str, list[bytes]] = {}
            for tier, key in part:
                by_tier.setdefault(tier, []).append(key)
            self._send(identity, p.Cached([p.CacheEvents(t, keys) for t, keys in by_tier.items()],
                                          snapshot=start == 0))

    def _refuse(self, route: Route, error: p.Error) -> None:
        self.routes.close(route.rid)
        self._send(route.router, error)

    # to the routers -----------------------------------------------------------------------------------------
    def deliver(self, events: list[p.Event]) -> None:
        """Sends the ranks' events to the routers that asked; a final one closes the route."""
        for event in events:
            route = self.routes.get(event.rid)
            if route is None:
                continue  # aborted meanwhile: the router no longer listens
            self._send(route.router, event)
            if isinstance(event, p.Error):
                log.warning("request %s failed on rank %d: %s", event.rid, route.rank, event.message)
            if p.is_final(event):
                self.routes.close(event.rid)

    def status(self) -> p.Status:
        eplb = msgspec.convert(self.eplb_metrics(), p.EplbStatus) if self.eplb_metrics is not None else None
        return p.Status(p.PROTOCOL_VERSION, self.name, self.cfg.role, self.block_size, self.loads, eplb,
                        self.draining, self.cache_root, self.tier_domains)

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self.cfg.heartbeat_s:
            self._last_beat = now
            status = p.encode(self.status())
            for identity in self.routers:
                self.socket.send_multipart([identity, status])

    def _send(self, identity: bytes, msg: p.Message) -> None:
        self.socket.send_multipart([identity, p.encode(msg)])

    def close(self) -> None:
        self.socket.close(0)
