"""Test-only knobs, in one clearly named section: fault injection and emulated latency. Production configs
never set them."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.errors import check


@dataclass
class TestingConfig:
    """Knobs that make faults and slow networks reproducible on one CPU machine."""

    __test__ = False  # not a pytest test class

    comm_delay_ms: float = 0.0
    """Every all_to_all completes this much later than it really did, emulating network latency so overlap
    can be seen on a CPU machine where gloo on loopback is fast (0: off)."""
    drop_kv_transfers: int = 0
    """A prefill instance's rank 0 drops its first N KV transfers instead of sending them (they time out)."""

    def __post_init__(self) -> None:
        check(self.comm_delay_ms >= 0, "testing.comm_delay_ms", self.comm_delay_ms, "must be >= 0")
        check(self.drop_kv_transfers >= 0, "testing.drop_kv_transfers", self.drop_kv_transfers, "must be >= 0")
