"""Transfer states and the messages both sides agree on.

A transfer moves one request's cached latents (every layer, the request's pages) from a prefill rank to
the pages a decode rank reserved for it before the transfer started. Both ends keep an explicit state per
request; every state but PENDING is final:

  sender:   PENDING -> DONE (receiver stored it) | REJECTED (receiver refused: unknown, expired or
            mismatched) | TIMED_OUT (no answer in time) | CANCELLED (the request was aborted first)
  receiver: PENDING (pages reserved) -> DONE (latents written) | TIMED_OUT (nothing arrived in time) |
            CANCELLED

On any final state other than DONE the owner frees the request's pages on its side; the prefill side may
retry once on another decode rank. A request cancelled in prefill is never sent.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import asdict, dataclass, field


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
class KVHeader:
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
    rng_state: str = ""
    """Base64 of the request's sampling generator state after the first token ('' for greedy)."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def decode(raw: bytes) -> "KVHeader":
        return KVHeader(**json.loads(raw))

    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_pages, self.block_size, self.row_width)


@dataclass
class Transfer:
    request_id: str
    deadline: float
    state: TransferState = TransferState.PENDING
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    nbytes: int = 0
    first_token: int = -1
    """Receiver side: the token prefill sampled, from the header."""
    num_tokens: int = 0
    """Receiver side: tokens whose latents arrived."""
    rng_state: str = ""
    """Receiver side: the header's generator state."""

    def finish(self, state: TransferState, detail: str = "") -> None:
        if not self.state.final:
            self.state, self.detail, self.finished = state, detail, time.monotonic()

    @property
    def latency_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.started
