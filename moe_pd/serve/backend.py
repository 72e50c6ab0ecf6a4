"""What the HTTP app needs from whatever generates (no torch here: the router imports it).

A handler `submit`s a request with a Stream; its tokens, or an Exception, arrive on the stream's asyncio
queue. Two backends: `EngineLoop` (one engine in this process) and the router's `ClusterBackend` (a PD
cluster behind it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from moe_pd.serve.metrics import Metrics
    from moe_pd.serve.openai_api import GenerationRequest


@dataclass
class Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    """Items: (token ids, finished, finish reason) or an Exception."""
    submitted: float = field(default_factory=time.monotonic)


class Backend(Protocol):
    def submit(self, stream: Stream, request: "GenerationRequest") -> None:
        """Starts the request; its tokens (or an Exception) arrive on `stream.tokens`."""

    def abort(self, request_id: str) -> None:
        """Drops the request wherever it is and frees its pages."""

    def health(self) -> tuple[bool, dict]:
        """(able to serve, a JSON body describing the instances)."""

    def refresh(self, metrics: "Metrics") -> None:
        """Updates the instance gauges before a scrape."""
