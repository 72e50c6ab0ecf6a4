"""What the tiers did, per process: the figures /metrics and the benchmark report (no torch)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

TIERS = ("dram", "disk")


@dataclass
class TierStats:
    lookup_pages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    """Pages a lookup found in each tier (beyond the device's own prefix cache)."""
    promoted_pages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    """Pages copied back into device pages intact, by the tier they came from."""
    promotion_misses: int = 0
    """Pages found at lookup that could not be served (reclaimed meanwhile, damaged): recomputed instead."""
    offered_pages: int = 0
    """Device pages offered to the tiers (write-through or write-back)."""
    dram_writes: int = 0
    """Pages written into the DRAM tier (offers and disk hits; pages already there are not rewritten)."""
    dram_write_failures: int = 0
    """Pages the DRAM tier could not take (no slot could be had, or the shared memory is full)."""
    disk_writes: int = 0
    """Pages written to disk (written through from DRAM, or offered straight to disk without DRAM)."""
    disk_backlog_dropped: int = 0
    """Pages not written to disk because the write backlog was full (the disk is slower than the device)."""
    promotions: int = 0
    """Promotion batches (one per admitted sequence with a tier hit)."""
    load_seconds: float = 0.0
    """Summed time from a promotion's start to its pages being usable."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, value: float = 1, tier: str | None = None) -> None:
        with self._lock:
            if tier is None:
                setattr(self, name, getattr(self, name) + value)
            else:
                getattr(self, name)[tier] += value

    def snapshot(self) -> dict:
        with self._lock:
            return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
                    for f in fields(self) if not f.name.startswith("_")}
