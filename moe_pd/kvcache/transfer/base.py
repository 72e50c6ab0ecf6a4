"""The KV transfer contract: transfer states, the transfer entry a request holds, and the messages both ends
of a transfer engine exchange (typed, validated: a malformed one is logged and dropped).

A transfer moves one request's cached latents (every layer, the request's pages) from a prefill rank to the
pages a decode rank reserved for it before the transfer started. The request's record holds the entry
(moe_pd.engine.core.request); the transports keep no per-request state of their own:

  sender:   PENDING -> DONE (receiver stored it) | REJECTED (receiver refused: unknown, expired or
            mismatched) | TIMED_OUT (no answer in time) | CANCELLED (the request was aborted first)
  receiver: PENDING (pages reserved) -> DONE (latents written) | REJECTED (mismatched) | TIMED_OUT
            (nothing arrived in time) | CANCELLED

On any final state other than DONE the owner frees the request's pages on its side; the router may re-run
the request once on another decode rank. A request aborted in prefill is never sent, and KV arriving for a
request the receiver no longer expects is rejected.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

import msgspec

log = logging.getLogger(__name__)


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    REJECTED = "rejected"
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
    """Sender side: the decode rank's KV address."""
    state: TransferState = TransferState.PENDING
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    nbytes: int = 0

    def finish(self, state: TransferState, detail: str = "") -> None:
        if not self.state.final:
            self.state, self.detail, self.finished = state, detail, time.monotonic()

    @property
    def latency_s(self) -> float:
        return 0.0 if self.finished is None else self.finished - self.started


class KVHeader(msgspec.Struct, forbid_unknown_fields=True):
    """What travels in front of the latents: enough for the receiver to check they fit its pages."""

    request_id: str
    num_layers: int
    num_pages: int
    block_size: int
    row_width: int
    dtype: str
    num_tokens: int
    first_token: int = -1
    """The token prefill sampled; decode continues from it."""
    sender: str = ""
    rng_state: bytes = b""
    """The request's sampling generator state after the first token (empty for greedy)."""

    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_pages, self.block_size, self.row_width)


class KVAnswer(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The receiver's answer to one transfer."""

    request_id: str
    state: TransferState
    detail: str = ""


@dataclass
class Arrival:
    """Receiver side: one transfer that ended (its latents stored, or refused)."""

    request_id: str
    state: TransferState
    detail: str
    nbytes: int
    header: KVHeader


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
