"""Communication/computation overlap and profiling schemas."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.errors import check


@dataclass
class OverlapConfig:
    """Two micro-batches per step: one computes while the other's all-to-all is in flight."""

    enabled: bool = False
    """Split steps into two micro-batches (prefill: 2 stages per layer, delta 0; decode: 5 stages, delta 2)."""
    min_tokens: int = 2
    """Split only when some rank runs at least this many tokens in the step (every rank decides alike)."""

    def __post_init__(self) -> None:
        check(self.min_tokens >= 2, "overlap.min_tokens", self.min_tokens,
              "must be >= 2 (a step of one token cannot split)")


@dataclass
class ProfileConfig:
    """torch.profiler per rank; traces at <run dir>/profile/<role>/iter_<step>/rank<rank>_trace.json.gz."""

    enabled: bool = False
    """Record traces (off by default: profiling costs time)."""
    wait: int = 1
    """Steps skipped before warm-up."""
    warmup: int = 1
    """Steps profiled but discarded."""
    active: int = 2
    """Steps recorded into each trace."""
    repeat: int = 1
    """Cycles of wait/warmup/active (0: until the run ends)."""
    record_shapes: bool = False
    """Record operator input shapes."""
    with_stack: bool = False
    """Record Python stacks (large traces)."""

    def __post_init__(self) -> None:
        for name in ("wait", "warmup", "repeat"):
            check(getattr(self, name) >= 0, f"profile.{name}", getattr(self, name), "must be >= 0")
        check(self.active > 0, "profile.active", self.active, "must be > 0")
