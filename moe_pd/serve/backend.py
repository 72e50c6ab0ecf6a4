"""What the HTTP app needs from whatever generates (no torch here: the router imports it).

A handler `submit`s one Job per sequence (a choice of a request) with a Stream; its Chunks, or an Exception,
arrive on the stream's asyncio queue (several streams of one request may share a queue: each item is tagged
with its stream's index). Two backends: `EngineLoop` (one engine in this process) and the router's
`ClusterBackend` (a PD cluster behind it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from moe_pd.engine.core.request import Logprob, SamplingParams

if TYPE_CHECKING:
    from moe_pd.serve.metrics import Metrics


@dataclass
class Job:
    """One sequence to generate: a prompt (token ids) and how."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Chunk:
    """New tokens of a sequence (or its end)."""

    ids: list[int]
    finished: bool
    reason: str | None = None
    logprobs: list[Logprob] | None = None
    """The tail of `ids`' log-probabilities, when asked for."""
    prompt_logprobs: list[Logprob | None] | None = None
    """With the first tokens: the prompt's log-probabilities, when asked for (echo)."""
    cached: int | None = None
    """With the first tokens: prompt tokens served from a cache (device pages or a KV tier)."""


@dataclass
class Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    """Items: (index, Chunk or Exception)."""
    index: int = 0
    submitted: float = field(default_factory=time.monotonic)

    def put(self, item: "Chunk | Exception") -> None:
        """From the event loop's thread (other threads: loop.call_soon_threadsafe(stream.put, item))."""
        self.tokens.put_nowait((self.index, item))


class Backend(Protocol):
    def submit(self, stream: Stream, job: Job) -> None:
        """Starts the job; its Chunks (or an Exception) arrive on `stream.tokens`."""

    def abort(self, request_id: str) -> None:
        """Drops the request wherever it is and frees its pages."""

    def health(self) -> tuple[bool, dict]:
        """(able to serve, a JSON body describing the instances)."""

    def refresh(self, metrics: "Metrics") -> None:
        """Updates the instance gauges before a scrape."""
