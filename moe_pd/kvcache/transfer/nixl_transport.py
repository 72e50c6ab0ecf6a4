"""KV transfer on NIXL: one-sided WRITEs from the prefill pool straight into the reserved decode pages, and
one-sided READs of a peer's pages (the KV tiers' cross-node prefix fetch).

Both ends implement the transfer contract (moe_pd.kvcache.transfer.base) over one NixlAgent per rank and keep
no per-request state beyond NIXL's in-flight handles: the requests' records hold the transfer entries
(deadlines, outcomes), the receiver asks its owner for a request's reserved pages. Why WRITE and not vLLM's
decode-side READ: docs/kv_transfer.md.

The sender (a prefill rank) loads the decode rank's metadata from the request's KVTarget (once per peer),
builds a descriptor per layer and page run (page_map.py) and posts one NIXL WRITE whose `Delivered` notice
NIXL sends after the last byte landed; it announces the write with a `Started` notice so the target
progresses UCX closely meanwhile. When it gives up (the request's deadline, an abort, a transport error) it
releases the write and sends `Abandoned` (best effort). The receiver turns notices into Arrivals: DONE for a
`Delivered` that matches the reservation, REJECTED for one that does not, FAILED for `Abandoned`.

Releasing an in-flight UCX write does not stop it at once: bytes already queued keep landing (about 2 s for
a 200 MB write over loopback TCP, measured), and carry whatever the source pages then hold. So a
reservation that ends without its KV keeps its pages FENCED (moe_pd.engine.core.request) until a notice
proves no write is under way (a late `Delivered`, or `Abandoned` for a write never posted: `Arrival.quiet`)
or its deadline plus `fence_s` passed. That bound holds because a sender never posts past the reservation's
expiry and ends every write by then (the request's deadline is capped at it), so `fence_s` must exceed the
control path's delay plus an aborted write's drain; it is the configured KV timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from moe_pd.kvcache.transfer.base import (
    Arrival,
    KVAnswer,
    KVHeader,
    KVTarget,
    TransferError,
    TransferState,
    decode_header,
    encode,
)
from moe_pd.kvcache.transfer.nixl_agent import Abandoned, Delivered, NixlAgent, PeerInfo, ReadDone, Started
from moe_pd.kvcache.transfer.page_map import descriptors, row_runs

log = logging.getLogger(__name__)

SCHEME = "nixl://"


def peer_name(address: str) -> str:
    return address.removeprefix(SCHEME)


class _Initiator:
    """Builds, posts and gives up on one-sided transfers from this rank's agent."""

    def __init__(self, agent: NixlAgent) -> None:
        self.agent, self.layout, self.name = agent, agent.layout, agent.name

    def _peer(self, raw: bytes) -> PeerInfo:
        try:
            return self.agent.add_peer(raw)
        except ValueError as exc:
            raise TransferError(str(exc)) from exc
        except Exception as exc:  # NIXL refuses metadata it cannot load
            raise TransferError(f"NIXL could not load the peer: {type(exc).__name__}: {exc}") from exc

    def _post(self, op: str, transfer_id: str, peer: PeerInfo, local_rows, remote_rows, lengths,
              notice: bytes) -> int:
        """Posts one transfer moving `lengths` rows between local and remote rows, every layer; returns the
        bytes it moves. Raises TransferError when NIXL refuses it."""
        local = descriptors(self.layout, local_rows, lengths)
        remote = descriptors(peer.layout, remote_rows, lengths)
        api = self.agent.agent
        try:
            handle = api.initialize_xfer(op.upper(), api.get_xfer_descs(local, self.layout.mem_type),
                                         api.get_xfer_descs(remote, peer.layout.mem_type), peer.name, notice)
        except Exception as exc:  # NIXL refuses addresses outside the registered pools, or a gone peer
            raise TransferError(f"NIXL refused the transfer: {exc}") from exc
        self.agent.notify(peer.name, Started(transfer_id))
        try:
            state = self.agent.post(transfer_id, op, handle)
        except Exception as exc:
            state = f"ERR ({type(exc).__name__}: {exc})"
        if state.startswith("ERR"):
            self.agent.release(transfer_id, handle)
            raise TransferError(f"posting failed: {state}")
        return int(local[:, 1].sum())

    def _give_up(self, transfer_id: str, peer: str, posted: bool, reason: str, op: str) -> None:
        if posted:
            self.agent.abort(transfer_id)
        log.info("KV %s %s with %s given up: %s", op, transfer_id, peer, reason)
        self.agent.notify(peer, Abandoned(transfer_id, posted, reason, op))


class NixlSender(_Initiator):
    """Prefill side: WRITEs a request's rows into the decode rank's reserved pages."""

    backend = "nixl"

    def send(self, target: KVTarget, kv_LPSW: torch.Tensor, pages: list[int], header: KVHeader,
             deadline: float) -> int:
        if kv_LPSW.data_ptr() != self.layout.base_ptr:
            raise ValueError("NIXL sends from the pool its agent registered")
        peer = self._peer(target.peer)
        if time.monotonic() >= deadline:
            raise TransferError("the reservation expired before the write")
        n = header.num_tokens
        try:
            runs = row_runs(pages, self.layout.block_size, target.pages, peer.layout.block_size, n,
                            self.layout.num_pages, peer.layout.num_pages)
        except ValueError as exc:
            raise TransferError(f"bad descriptors: {exc}") from exc
        used = list(target.pages[:-(-n // peer.layout.block_size)])
        notice = Delivered(header.request_id, used, n, encode(header))
        if len(runs) == 0:  # nothing to move: the notice alone
            if not self.agent.notify(peer.name, notice):
                raise TransferError(f"the notice to {peer.name} could not be sent")
            self.agent.finished["write"].append((header.request_id, "DONE", ""))
            return 0
        return self._post("write", header.request_id, peer, runs[:, 0], runs[:, 1], runs[:, 2], encode(notice))

    def poll(self) -> list[KVAnswer]:
        answers = []
        finished = self.agent.finished["write"]
        while finished:
            transfer_id, state, detail = finished.popleft()
            if state == "DONE":
                answers.append(KVAnswer(transfer_id, TransferState.DONE))
            else:
                answers.append(KVAnswer(transfer_id, TransferState.FAILED, f"transfer failed: {detail or state}"))
        return answers

    def cancel(self, request_id: str, target: KVTarget, posted: bool, reason: str) -> None:
        try:
            self._peer(target.peer)  # a request aborted before its first transfer to this peer: load it to tell it
        except TransferError:
            pass
        self._give_up(request_id, peer_name(target.address), posted, reason, "write")

    def close(self) -> None:
        self.agent.close()


class NixlReceiver:
    """Decode side: reserved pages are written by the sender; `poll` turns its notices into Arrivals."""

    backend = "nixl"

    def __init__(self, agent: NixlAgent, fence_s: float) -> None:
        self.agent, self.layout, self.fence_s = agent, agent.layout, fence_s
        self.address = SCHEME + agent.name
        self.metadata = agent.metadata()

    def target(self, pages: list[int], expires_in_s: float) -> KVTarget:
        self.agent.expect_until(time.monotonic() + expires_in_s + self.fence_s)
        return KVTarget(self.backend, self.address, expires_in_s, list(pages), self.metadata)

    def poll(self, pages_for: Callable[[str], list[int] | None]) -> list[Arrival]:
        arrivals = []
        notices = self.agent.notices["write"]
        while notices:
            peer, notice = notices.popleft()
            pages = pages_for(notice.transfer_id)
            if pages is None:
                self.agent.counters["unexpected_notices"] += 1
                log.info("NIXL %s from %s for %s, which is not waiting for KV", type(notice).__name__, peer,
                         notice.transfer_id)
            if isinstance(notice, Abandoned):
                arrivals.append(Arrival(notice.transfer_id, TransferState.FAILED,
                                        f"the sender gave up: {notice.reason}", 0, None, quiet=not notice.posted))
            else:
                arrivals.append(self._delivered(peer, notice, pages))
        return arrivals

    def _delivered(self, peer: str, notice: Delivered, pages: list[int] | None) -> Arrival:
        header = decode_header(notice.payload)
        tid, n = notice.transfer_id, notice.num_tokens
        nbytes = n * self.layout.num_layers * self.layout.row_bytes
        if pages is None:
            return Arrival(tid, TransferState.REJECTED, "no pages reserved for this request", nbytes, header)
        fits = (header is not None and header.num_tokens == n and n <= len(pages) * self.layout.block_size
                and notice.dst_pages == pages[:len(notice.dst_pages)])
        if not fits:
            log.error("KV transfer %s from %s wrote %d rows into pages %s, reserved %s", tid, peer, n,
                      notice.dst_pages, pages)
            return Arrival(tid, TransferState.REJECTED, "the written pages are not the reserved ones", nbytes, header)
        return Arrival(tid, TransferState.DONE, "", nbytes, header)

    def close(self) -> None:
        self.agent.close()


class NixlReader(_Initiator):
    """READs pages of a peer's pool into this rank's pool: the "read these pages from that peer" call.

    The caller (the KV tiers' prefix fetch) owns the request's state: it calls `read`, then `poll` until the
    read ends, and `cancel` at its deadline. The peer must keep the pages unchanged from `read` until
    `served()` on its side reports the transfer (NIXL's `ReadDone` notice, or `Abandoned`). After a cancel
    or a failure, bytes may still land in the local pages for a while: keep them out of use for the
    fence (the KV timeout) or until they are overwritten by a later, completed read.
    """

    def read(self, transfer_id: str, peer_metadata: bytes, remote_pages: Sequence[int], local_pages: Sequence[int],
             num_tokens: int) -> int:
        """Starts moving the peer's first `num_tokens` rows of `remote_pages` into `local_pages`; returns the
        bytes. Raises TransferError when it cannot start (nothing posted)."""
        peer = self._peer(peer_metadata)
        try:
            runs = row_runs(remote_pages, peer.layout.block_size, local_pages, self.layout.block_size, num_tokens,
                            peer.layout.num_pages, self.layout.num_pages)
        except ValueError as exc:
            raise TransferError(f"bad descriptors: {exc}") from exc
        if len(runs) == 0:
            self.agent.finished["read"].append((transfer_id, "DONE", ""))
            return 0
        return self._post("read", transfer_id, peer, runs[:, 1], runs[:, 0], runs[:, 2], encode(ReadDone(transfer_id)))

    def poll(self) -> list[KVAnswer]:
        """Reads that ended: DONE (every byte is in the local pages) or FAILED."""
        finished, answers = self.agent.finished["read"], []
        while finished:
            transfer_id, state, detail = finished.popleft()
            answers.append(KVAnswer(transfer_id, TransferState.DONE if state == "DONE" else TransferState.FAILED,
                                    "" if state == "DONE" else f"transfer failed: {detail or state}"))
        return answers

    def cancel(self, transfer_id: str, peer: str, posted: bool = True, reason: str = "cancelled") -> None:
        self._give_up(transfer_id, peer, posted, reason, "read")

    def served(self) -> list[str]:
        """The page owner's side: transfer ids of peers' reads of this pool that ended (the pages they named
        may change again)."""
        notices, out = self.agent.notices["read"], []
        while notices:
            out.append(notices.popleft()[1].transfer_id)
        return out

