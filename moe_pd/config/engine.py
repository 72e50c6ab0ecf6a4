"""What every command that runs the model configures, shared by the command schemas (generate, serve,
and a PD cluster's instances) instead of each repeating the fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_pd.config.eplb import EplbConfig
from moe_pd.config.errors import check
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.overlap import OverlapConfig, ProfileConfig
from moe_pd.config.parallel import ParallelConfig
from moe_pd.config.runtime import RuntimeConfig
from moe_pd.config.speculative import SpeculativeConfig
from moe_pd.config.testing import TestingConfig


@dataclass
class EngineConfig:
    """The model, where it runs, its cache and the size of one engine step."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (or checkpoint path)."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device and precision."""
    kvcache: KVCacheConfig = field(default_factory=KVCacheConfig)
    """Paged latent cache (per rank)."""
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    """Two-micro-batch overlap of all-to-all and compute (meaningful with expert parallelism)."""
    max_num_batched_tokens: int = 4096
    """Token budget of one engine step: decodes first, then prefill chunks (a longer prompt is chunked)."""
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    """MTP speculative decoding (needs a checkpoint with an MTP layer)."""

    def __post_init__(self) -> None:
        check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", self.max_num_batched_tokens, "must be > 0")


@dataclass
class RankGroupConfig(EngineConfig):
    """An engine whose ranks form one EP group (torchrun): their layout, expert balancing and traces."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Rank layout (EP over every rank of the job)."""
    eplb: EplbConfig = field(default_factory=EplbConfig)
    """Expert load balancing."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Per-rank torch.profiler traces."""
    testing: TestingConfig = field(default_factory=TestingConfig)
    """Test-only knobs (fault injection, emulated latency)."""
