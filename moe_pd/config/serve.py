"""Schema of `python -m moe_pd.serve.api_server` (colocated mode: one instance, one process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_pd.config.errors import check
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.overlap import OverlapConfig
from moe_pd.config.runtime import RuntimeConfig


@dataclass
class ServeConfig:
    """An OpenAI-compatible HTTP server over one engine."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (or checkpoint path)."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device and precision."""
    kvcache: KVCacheConfig = field(default_factory=KVCacheConfig)
    """Paged latent cache."""
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    """Two-micro-batch overlap (meaningful with expert parallelism)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start-up)."""
    served_model_name: str = "moe_pd"
    """The model id clients send in 'model' and /v1/models lists."""
    max_num_seqs: int = 64
    """Requests generated together."""
    max_num_batched_tokens: int = 4096
    """Token budget of one engine step (decodes first, then prefill chunks)."""
    max_tokens_limit: int = 4096
    """Largest 'max_tokens' a request may ask for."""

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, "port", self.port, "must be in [0, 65535]")
        check(self.max_num_seqs > 0, "max_num_seqs", self.max_num_seqs, "must be > 0")
        check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", self.max_num_batched_tokens, "must be > 0")
        check(self.max_tokens_limit > 0, "max_tokens_limit", self.max_tokens_limit, "must be > 0")
