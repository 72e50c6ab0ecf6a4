"""Request and sequence state, plain Python."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from moe_pd.engine.core.request import InvalidRequest


class Status(enum.Enum):
    WAITING = "waiting"
    """Queued, or preempted and waiting to recompute."""
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


_ids = itertools.count()


def prompt_problem(prompt_ids: list[int], vocab_size: int, max_context: int) -> str | None:
    """Why the model cannot take this prompt (ids outside the vocabulary, no room left in the context to
    generate), or None. The engine and the HTTP front both check with it."""
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        return f"token ids outside [0, {vocab_size}): {bad[:5]}"
    if len(prompt_ids) >= max_context:
        return f"prompt of {len(prompt_ids)} tokens does not fit the context of {max_context}"
    return None


@dataclass
class Sequence:
    prompt_ids: list[int]
    max_new_tokens: int
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    eos_token_id: int | None = None
    ignore_eos: bool = False
    arrival: int = field(default_factory=lambda: next(_ids))
    """Arrival order; the scheduler preempts the latest arrival first."""
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose latents are in the cache (prefix-cache hits count)."""
    num_cached_hit: int = 0
    """Prompt tokens served from the prefix cache at the last admission."""
    num_preemptions: int = 0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidRequest(f"request {self.request_id}: empty prompt")
        if self.max_new_tokens <= 0:
            raise InvalidRequest(f"request {self.request_id}: max_new_tokens must be > 0")

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole prompt + output list (a decode step needs one)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.num_uncomputed > 1

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def append_token(self, token: int) -> None:
        """Records a sampled token and finishes the sequence on EOS or length."""
        self.output_ids.append(token)
        if token == self.eos_token_id and not self.ignore_eos:
            self.status, self.finish_reason = Status.FINISHED, "stop"
        elif len(self.output_ids) >= self.max_new_tokens:
            self.status, self.finish_reason = Status.FINISHED, "length"
