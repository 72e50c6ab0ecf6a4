"""KV transfer engine on NIXL: one-sided WRITEs from the prefill pool into reserved decode pages.

The initiator (prefill rank) writes a request's rows straight into the pages the target (decode rank)
reserved, with one NIXL request per transfer holding a descriptor per layer and page run (page_map.py),
and NIXL delivers a `Delivered` notice after the last byte landed. Why WRITE and not vLLM's decode-side
READ: see docs/kv_transfer.md. Both ends keep an explicit state per transfer; every state but PENDING is
final:

  initiator: PENDING -> DONE (every byte written, notice sent) | FAILED (bad descriptors, peer gone,
             transport error) | TIMED_OUT | CANCELLED
  target:    PENDING (pages reserved) -> DONE (a notice matching the reservation) | REJECTED (a notice
             that does not match it) | FAILED (the initiator gave up) | TIMED_OUT | CANCELLED

A final initiator state means the source pages are the caller's again: free them (an aborted UCX write
is not stopped at once: bytes already queued keep landing, about 2 s for 200 MB over loopback TCP, and carry
whatever the pages then hold, into target pages that are fenced for that reason). On the target, DONE
hands the pages to the request; after any other final state the pages are *reclaimed* (reported by
`poll`, then free them) only once nothing can write into them any more: at once when a notice proves the
write ended or never started, otherwise after a fence: the reservation's deadline plus `fence_s`. The
fence holds because an initiator never posts a write past the reservation's expiry (`not_after`) and
ends any write within its own timeout, so `fence_s` must exceed the initiator's timeout plus the control
path's delay. Notices for unknown transfers and malformed notices are logged and counted, never applied.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import torch

from moe_pd.kvcache.transfer.nixl_agent import Abandoned, Delivered, NixlAgent, decode_notice, encode
from moe_pd.kvcache.transfer.page_map import descriptors, row_runs

log = logging.getLogger(__name__)


class XferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


@dataclass
class Write:
    """Initiator side of one transfer."""

    transfer_id: str
    peer: str
    deadline: float
    nbytes: int = 0
    num_descs: int = 0
    state: XferState = XferState.PENDING
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def finish(self, state: XferState, detail: str = "") -> bool:
        if self.state is not XferState.PENDING:
            return False
        self.state, self.detail, self.finished = state, detail, time.monotonic()
        return True

    @property
    def latency_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


@dataclass
class Arrival(Write):
    """Target side of one transfer: the reserved pages and, once DONE, what the notice carried."""

    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0
    payload: bytes = b""
    reclaim_at: float | None = None
    """For a final state other than DONE: when the pages may be reused (a fence), None once reclaimed."""


@dataclass
class Progress:
    """What one `poll` saw end."""

    writes: list[Write] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    reclaimed: list[Arrival] = field(default_factory=list)
    """Failed arrivals whose pages nothing will write into any more: free them now."""


class NixlEngine:
    """A rank's end of NIXL KV transfers: `write` as a prefill rank, `expect` as a decode rank, `poll` both."""

    def __init__(self, name: str, kv_LPSW: torch.Tensor, ucx_env: Mapping[str, str] | None = None,
                 fence_s: float = 60.0, progress_interval_s: float = 0.001) -> None:
        self.agent = NixlAgent(name, kv_LPSW, ucx_env, progress_interval_s)
        self.layout, self.fence_s = self.agent.layout, fence_s
        self.writes: dict[str, Write] = {}
        self.arrivals: dict[str, Arrival] = {}
        self.fenced: dict[str, Arrival] = {}
        self.counters = {"unknown_notices": 0, "malformed_notices": 0, "late_notices": 0}
        self.agent.busy = lambda: bool(self.agent.handles or self.arrivals or self.fenced)

    @property
    def name(self) -> str:
        return self.agent.name

    def metadata(self) -> bytes:
        return self.agent.metadata()

    def add_peer(self, raw: bytes) -> str:
        return self.agent.add_peer(raw).name

    # initiator ---------------------------------------------------------------------------------------------

    def write(self, transfer_id: str, peer: str, src_pages: Sequence[int], dst_pages: Sequence[int],
              num_tokens: int, payload: bytes, timeout_s: float, not_after: float | None = None) -> Write:
        """Writes the first `num_tokens` tokens of `src_pages` into the peer's `dst_pages`. Never raises for a
        bad request: the returned Write is FAILED with the reason, and the peer is told it may reclaim."""
        if transfer_id in self.writes:
            raise ValueError(f"transfer {transfer_id} is already in flight")
        write = Write(transfer_id, peer, time.monotonic() + timeout_s)
        info = self.agent.peers.get(peer)
        if info is None:
            write.finish(XferState.FAILED, f"unknown peer {peer} (add its metadata first)")
            return write
        if not_after is not None and time.monotonic() > not_after:
            return self._give_up(write, XferState.FAILED, "the reservation expired before the write", False)
        try:
            runs = row_runs(src_pages, self.layout.block_size, dst_pages, info.layout.block_size, num_tokens,
                            self.layout.num_pages, info.layout.num_pages)
        except ValueError as exc:
            return self._give_up(write, XferState.FAILED, f"bad descriptors: {exc}", False)
        used = list(dst_pages[:-(-num_tokens // info.layout.block_size)])
        notice = encode(Delivered(transfer_id, used, num_tokens, payload))
        if len(runs) == 0:
            return self._notify(write, notice)
        local = descriptors(self.layout, runs[:, 0], runs[:, 2])
        remote = descriptors(info.layout, runs[:, 1], runs[:, 2])
        write.nbytes, write.num_descs = int(local[:, 1].sum()), len(local)
        api = self.agent.agent
        try:
            handle = api.initialize_xfer("WRITE", api.get_xfer_descs(local, self.layout.mem_type),
                                         api.get_xfer_descs(remote, info.layout.mem_type), peer, notice)
        except Exception as exc:  # NIXL refuses addresses outside the registered pools, or a gone peer
            return self._give_up(write, XferState.FAILED, f"NIXL refused the transfer: {exc}", False)
        try:
            state = self.agent.post(transfer_id, handle)
        except Exception as exc:
            state = f"ERR ({type(exc).__name__}: {exc})"
        if state.startswith("ERR"):
            self.agent.release(transfer_id, handle)
            return self._give_up(write, XferState.FAILED, f"posting failed: {state}", True)
        self.writes[transfer_id] = write
        return write

    def cancel_write(self, transfer_id: str) -> Write | None:
        """Ends an in-flight write (NIXL aborts what it can); the source pages are then free."""
        write = self.writes.pop(transfer_id, None)
        if write is None:
            return None
        if self.agent.abort(transfer_id):
            self._give_up(write, XferState.CANCELLED, "cancelled", True)
        else:  # it had just ended: the peer got that transfer's own notice
            write.finish(XferState.CANCELLED, "cancelled after the transfer ended")
        return write

    def _notify(self, write: Write, notice: bytes) -> Write:
        try:
            self.agent.agent.send_notif(write.peer, notice)
            write.finish(XferState.DONE)
        except Exception as exc:
            write.finish(XferState.FAILED, f"notice not sent: {exc}")
        return write

    def _give_up(self, write: Write, state: XferState, reason: str, posted: bool) -> Write:
        write.finish(state, reason)
        log.warning("KV write %s to %s: %s", write.transfer_id, write.peer, reason)
        try:
            self.agent.agent.send_notif(write.peer, encode(Abandoned(write.transfer_id, posted, reason)))
        except Exception as exc:  # the peer may be gone; its reservation then ends by its own deadline
            log.debug("could not tell %s about %s: %s", write.peer, write.transfer_id, exc)
        return write

    # target ------------------------------------------------------------------------------------------------

    def expect(self, transfer_id: str, pages: Sequence[int], timeout_s: float) -> Arrival:
        """Reserves `pages` for a transfer; the initiator must not post after `timeout_s` from now (ship the
        remaining time with the pages over the control path)."""
        if transfer_id in self.arrivals or transfer_id in self.fenced:
            raise ValueError(f"transfer {transfer_id} is already expected")
        arrival = Arrival(transfer_id, "", time.monotonic() + timeout_s, pages=list(pages))
        self.arrivals[transfer_id] = arrival
        self.agent.wake()
        return arrival

    def cancel_arrival(self, transfer_id: str) -> Arrival | None:
        """Ends a reservation; its pages come back through `poll` once nothing can write into them."""
        arrival = self.arrivals.pop(transfer_id, None)
        if arrival is not None:
            self._fence(arrival, XferState.CANCELLED, "cancelled")
        return arrival

    def _fence(self, arrival: Arrival, state: XferState, detail: str) -> None:
        arrival.finish(state, detail)
        arrival.reclaim_at = arrival.deadline + self.fence_s
        self.fenced[arrival.transfer_id] = arrival

    def _reclaim(self, arrival: Arrival, progress: Progress) -> None:
        self.fenced.pop(arrival.transfer_id, None)
        arrival.reclaim_at = None
        progress.reclaimed.append(arrival)

    def _on_notice(self, peer: str, raw: bytes, progress: Progress) -> None:
        try:
            notice = decode_notice(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.counters["malformed_notices"] += 1
            log.warning("malformed NIXL notice from %s dropped: %s", peer, exc)
            return
        tid = notice.transfer_id
        pending, fenced = self.arrivals.get(tid), self.fenced.get(tid)
        if pending is None and fenced is None:
            self.counters["unknown_notices"] += 1
            level = logging.ERROR if isinstance(notice, Delivered) else logging.INFO
            log.log(level, "NIXL notice %s from %s for unknown transfer %s ignored", type(notice).__name__,
                    peer, tid)
            return
        if fenced is not None:  # late: the reservation already ended; the notice says whether writes are over
            self.counters["late_notices"] += 1
            if isinstance(notice, Delivered) or not notice.posted:
                self._reclaim(fenced, progress)
            return
        del self.arrivals[tid]
        pending.peer = peer
        if isinstance(notice, Abandoned):
            self._fence(pending, XferState.FAILED, f"the sender gave up: {notice.reason}")
            if not notice.posted:
                self._reclaim(pending, progress)
        elif (notice.num_tokens > len(pending.pages) * self.layout.block_size
              or notice.dst_pages != pending.pages[:len(notice.dst_pages)]):
            log.error("KV transfer %s from %s wrote pages %s, reserved %s", tid, peer, notice.dst_pages,
                      pending.pages)
            self._fence(pending, XferState.REJECTED, "the written pages are not the reserved ones")
            self._reclaim(pending, progress)
        else:
            pending.num_tokens, pending.payload = notice.num_tokens, notice.payload
            pending.nbytes = notice.num_tokens * self.layout.num_layers * self.layout.row_bytes
            pending.finish(XferState.DONE)
        progress.arrivals.append(pending)

    # both --------------------------------------------------------------------------------------------------

    def poll(self) -> Progress:
        """Applies what the progress thread saw and the deadlines; never blocks."""
        progress = Progress()
        while self.agent.finished:
            transfer_id, state, detail = self.agent.finished.popleft()
            write = self.writes.pop(transfer_id, None)
            if write is None:
                continue
            if state == "DONE":
                write.finish(XferState.DONE)
            else:
                self._give_up(write, XferState.FAILED, f"transfer failed: {detail or state}", True)
            progress.writes.append(write)
        while self.agent.notices:
            self._on_notice(*self.agent.notices.popleft(), progress)
        now = time.monotonic()
        for write in [w for w in self.writes.values() if now > w.deadline]:
            del self.writes[write.transfer_id]
            self.agent.abort(write.transfer_id)
            progress.writes.append(self._give_up(write, XferState.TIMED_OUT, "not written before the deadline",
                                                 True))
        for arrival in [a for a in self.arrivals.values() if now > a.deadline]:
            del self.arrivals[arrival.transfer_id]
            self._fence(arrival, XferState.TIMED_OUT, "no KV arrived before the deadline")
            progress.arrivals.append(arrival)
        for arrival in [a for a in self.fenced.values() if now >= a.reclaim_at]:
            self._reclaim(arrival, progress)
        return progress

    def close(self) -> None:
        self.agent.close()

