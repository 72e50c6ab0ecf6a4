"""Sampling schema: how the next token is chosen from the logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moe_pd.config.errors import check


@dataclass
class SamplingConfig:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p."""

    max_new_tokens: int = 32
    """Tokens to generate per prompt (fewer when EOS or the context end comes first)."""
    temperature: float = 0.0
    """0 picks the most likely token; > 0 samples from softmax(logits / temperature)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1 keeps all."""
    seed: Optional[int] = 0
    """Base seed; prompt i samples from its own generator seeded seed + i, so any batching gives the
    same tokens. None draws a fresh seed."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""

    def __post_init__(self) -> None:
        check(self.max_new_tokens > 0, "sampling.max_new_tokens", self.max_new_tokens, "must be > 0")
        check(self.temperature >= 0, "sampling.temperature", self.temperature, "must be >= 0")
        check(self.top_k >= 0, "sampling.top_k", self.top_k, "must be >= 0 (0 disables it)")
        check(0 < self.top_p <= 1, "sampling.top_p", self.top_p, "must be in (0, 1]")
