"""Top-level schema of `python -m moe_pd.generate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moe_pd.config.eplb import EplbConfig
from moe_pd.config.errors import ConfigError, check
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.overlap import OverlapConfig, ProfileConfig
from moe_pd.config.parallel import ParallelConfig
from moe_pd.config.runtime import RuntimeConfig
from moe_pd.config.sampling import SamplingConfig


@dataclass
class GenerateConfig:
    """Offline generation: a batch of prompts in, one JSON line per prompt out."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (or checkpoint path)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Rank layout."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Token selection."""
    kvcache: KVCacheConfig = field(default_factory=KVCacheConfig)
    """Paged latent cache."""
    eplb: EplbConfig = field(default_factory=EplbConfig)
    """Expert load balancing."""
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    """Two-micro-batch overlap of all-to-all and compute."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Per-rank torch.profiler traces."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device and precision."""
    prompts: list[str] = field(default_factory=list)
    """Text prompts."""
    prompt_ids: list[list[int]] = field(default_factory=list)
    """Prompts given as token ids (used after `prompts`)."""
    prompts_file: Optional[str] = None
    """JSON-lines file; each line {"prompt": str} or {"prompt_ids": [int, ...]}."""
    max_batch_size: int = 64
    """Sequences decoded together in one step."""
    max_num_batched_tokens: int = 4096
    """Token budget of one step: decodes first, then prefill chunks (a longer prompt is chunked)."""
    output: Optional[str] = None
    """File for the JSON lines; None writes them to stdout."""

    def __post_init__(self) -> None:
        check(self.max_batch_size > 0, "max_batch_size", self.max_batch_size, "must be > 0")
        check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", self.max_num_batched_tokens, "must be > 0")
        for i, ids in enumerate(self.prompt_ids):
            if not all(isinstance(t, int) for t in ids):
                raise ConfigError(f"prompt_ids[{i}]: must be a list of integers")
