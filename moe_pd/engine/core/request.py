"""A request's parameters, plain Python (the router and the HTTP front use them without torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class InvalidRequest(ValueError):
    """A request that can never run as asked (its prompt, its length, its size): it fails alone, as the
    client's error (HTTP 400), never as the server's."""
