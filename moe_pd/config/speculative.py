"""MTP speculative decoding schema (docs/speculative.md)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.errors import check


@dataclass
class SpeculativeConfig:
    """The checkpoint's multi-token-prediction layer drafts tokens that one forward of the model verifies."""

    num_draft_tokens: int = 0
    """K: tokens the MTP layer drafts per decoding request and step, in a chain (0: off). The model is built
    with its MTP layer and every cache page holds its latents too; greedy output is unchanged."""

    def __post_init__(self) -> None:
        check(0 <= self.num_draft_tokens <= 8, "speculative.num_draft_tokens", self.num_draft_tokens,
              "must be 0 (off) to 8")
