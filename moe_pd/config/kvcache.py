"""Paged MLA latent cache schema."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.errors import check


@dataclass
class KVCacheConfig:
    """Pages of `block_size` tokens, each holding the latent and the rope key of every layer."""

    block_size: int = 16
    """Tokens per page."""
    num_blocks: int = 1024
    """Pages in the pool of one rank."""
    prefix_cache: bool = True
    """Reuse the pages of a shared prompt prefix (chained hashes over full pages, token-checked)."""

    def __post_init__(self) -> None:
        check(self.block_size > 0, "kvcache.block_size", self.block_size, "must be > 0")
        check(self.num_blocks > 0, "kvcache.num_blocks", self.num_blocks, "must be > 0")
