"""The KV transfer contract: transfer states, the transfer entry a request holds, where a request's KV goes
(KVTarget), the messages both ends exchange (typed, validated: a malformed one is logged and dropped), and
the two ends every backend implements (KVSenderEnd on prefill ranks, KVReceiverEnd on decode ranks).

A transfer moves one request's cached latents (every layer, the request's first `num_tokens` rows) from a
prefill rank into the pages a decode rank reserved for it before the transfer started. The request's
record holds the entry (moe_pd.engine.core.request); the backends keep no per-request state of their own
beyond the transport's in-flight handles:

  sender:   PENDING -> DONE (stored at the receiver) | REJECTED (the receiver refused: unknown, expired or
            mismatched) | FAILED (never posted, or the transport failed: bad descriptors, peer gone) |
            TIMED_OUT (no answer in time) | CANCELLED (the request was aborted first)
  receiver: PENDING (pages reserved) -> DONE (latents written) | REJECTED (mismatched) | FAILED (the sender
            gave up) | TIMED_OUT (nothing arrived in time) | CANCELLED (aborted)

On any final state other than DONE the owner frees the request's pages on its side: the sender at once;
the receiver at once when nothing can write into them any more (`Arrival.quiet`, or a backend whose
receiver copies the bytes itself: `fence_s == 0`), otherwise after a fence (the request is FENCED until
then). The router may re-run the request once on another decode rank.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

log = logging.getLogger(__name__)

BACKENDS = ("zmq", "nixl")


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self is not TransferState.PENDING


@dataclass
class Transfer:
    """A request's transfer entry: until when it may take, how it ended."""

    deadline: float
    address: str = ""
    """The decode rank's identity (its KV address) on both sides."""
    state: TransferState = TransferState.PENDING
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    nbytes: int = 0
    reclaim_at: float | None = None
    """Decode side, a FENCED reservation: when its pages may be reused even without a notice."""

    def finish(self, state: TransferState, detail: str = "") -> None:
        if not self.state.final:
            self.state, self.detail, self.finished = state, detail, time.monotonic()

    @property
    def latency_s(self) -> float:
        return 0.0 if self.finished is None else self.finished - self.started


class KVTarget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one request's KV goes: a decode rank's reservation. The decode rank names it in its Reserved
    event, the router hands it to prefill in the Prefill message."""

    backend: str
    """The receiving rank's transfer backend ("zmq", "nixl"): the sender must speak it."""
    address: str
    """The receiving rank's identity: its ZeroMQ endpoint, or "nixl://<agent name>"."""
    expires_in_s: float
    """The reservation's remaining time when it was made: a sender never starts a transfer past it."""
    pages: list[int] = []
    """The reserved pages in token order (NIXL writes straight into them; empty for zmq, whose receiver
    looks them up)."""
    peer: bytes = b""
    """NIXL: the receiving rank's agent metadata and pool layout (nixl_agent.PeerInfo), loaded once."""


class KVHeader(msgspec.Struct, forbid_unknown_fields=True):
    """What travels with the latents: enough for the receiver to check they fit and to continue decoding."""

    request_id: str
    num_layers: int
    row_width: int
    dtype: str
    num_tokens: int
    """Rows per layer (the prompt's tokens); the receiver cuts them into its own pages."""
    first_token: int = -1
    """The token prefill sampled; decode continues from it."""
    sender: str = ""
    rng_state: bytes = b""
    """The request's sampling generator state after the first token (empty for greedy)."""
    drafts: list[int] = []
    """Speculative decoding: prefill's MTP drafts of the tokens after the first (greedy requests), which decode
    verifies in its first step."""
    cached_tokens: int = 0
    """Prompt tokens prefill served from a cache (device pages or a KV tier): decode reports them in usage."""

    def shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_tokens, self.row_width)


class KVAnswer(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """How one transfer ended, as the sending side learns it (zmq: the receiver's answer; NIXL: the write's
    completion)."""

    request_id: str
    state: TransferState
    detail: str = ""


@dataclass
class Arrival:
    """Receiver side: one transfer that ended (its latents stored, refused, or given up by the sender)."""

    request_id: str
    state: TransferState
    detail: str
    nbytes: int
    header: KVHeader | None
    quiet: bool = True
    """Nothing writes into the request's pages any more (False: a write the sender gave up on may still
    land until the fence ends)."""


class TransferError(RuntimeError):
    """A transfer that cannot start (bad pages, an unknown or gone peer, an expired reservation): the request
    fails at once, FAILED, and nothing was posted."""


class KVSenderEnd(Protocol):
    """A prefill rank's end of a backend."""

    backend: str

    def send(self, target: KVTarget, kv_LPSW, pages: list[int], header: KVHeader, deadline: float) -> int:
        """Starts moving the first `header.num_tokens` rows of `pages` to the target; returns the bytes moved.
        Raises TransferError when it cannot start. `deadline` (monotonic): the transfer ends by then."""

    def poll(self) -> list[KVAnswer]:
        """Transfers that ended since the last poll; never blocks."""

    def cancel(self, request_id: str, target: KVTarget, posted: bool, reason: str) -> None:
        """Gives up on a request's transfer (`posted`: whether `send` started it): stops what can be stopped
        and tells the receiver, best effort, so it can reuse the pages early."""

    def close(self) -> None: ...


class KVReceiverEnd(Protocol):
    """A decode rank's end of a backend."""

    backend: str
    address: str
    fence_s: float
    """How long after a failed reservation's deadline its pages stay FENCED when no notice proves that
    nothing writes into them any more (0: this backend's receiver copies the bytes itself)."""

    def target(self, pages: list[int], expires_in_s: float) -> KVTarget:
        """What a sender needs to move a request's KV into `pages`."""

    def poll(self, pages_for: Callable[[str], list[int] | None]) -> list[Arrival]:
        """Transfers that ended; `pages_for(request id)` names a RESERVED request's prompt pages (None: not
        expected, and KV for it is refused). Never blocks."""

    def close(self) -> None: ...


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(KVHeader)
_answer_decoder = msgspec.msgpack.Decoder(KVAnswer)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_header(raw: bytes) -> KVHeader | None:
    try:
        return _header_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("dropped a KV transfer with a malformed header: %s", exc)
        return None


def decode_answer(raw: bytes) -> KVAnswer | None:
    try:
        return _answer_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("dropped a malformed KV transfer answer: %s", exc)
        return None

