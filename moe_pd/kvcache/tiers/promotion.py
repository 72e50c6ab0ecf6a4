"""Pages of one sequence on their way from the KV tiers into its device pages (TierManager.promote)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from moe_pd.kvcache.tiers.disk_store import Entry
from moe_pd.kvcache.tiers.host_pool import HostPool, SlotRef
from moe_pd.kvcache.tiers.stats import TierStats


class Promotion:
    """Pages of one sequence on their way from the tiers into its device pages, in chain order."""

    def __init__(self, pages: Sequence[tuple[int, Entry]], sources: list[str], refs: list[SlotRef | None],
                 pool: HostPool | None, stats: TierStats) -> None:
        self.pages, self.sources, self.refs = list(pages), sources, refs
        self.copied = [False] * len(sources)
        self._pool, self._stats, self._started = pool, stats, time.perf_counter()
        self._done = threading.Event()
        self._event: torch.cuda.Event | None = None
        self._keep: list[torch.Tensor] = []  # staging buffers the copies read, alive until they finish
        self._result: int | None = None
        self.seconds = 0.0
        """From the start to the end of the copies (set by wait()); queueing behind other promotions counts,
        the time until a step looked does not."""
        self.copies_ended: float | None = None
        """When the tier thread finished (perf_counter)."""
        if not sources:
            self._done.set()

    @property
    def num_pages(self) -> int:
        """Pages found in the tiers when the promotion started (an upper bound on wait()'s answer)."""
        return len(self.sources)

    def ready(self) -> bool:
        return self._done.is_set() and (self._event is None or self._event.query())

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the copies end; returns how many leading pages are in their device pages intact."""
        if self._result is not None:
            return self._result
        if not self._done.wait(timeout):
            raise TimeoutError(f"promotion of {len(self.sources)} pages still running after {timeout} s")
        if self._event is not None:
            self._event.synchronize()
        self._keep.clear()
        held = [i for i, r in enumerate(self.refs) if r is not None and self.copied[i]]
        valid = dict(zip(held, self._pool.validate([self.refs[i] for i in held]))) if held else {}
        if self._pool is not None:
            self._pool.release([r for r in self.refs if r is not None])
        n = 0
        while n < len(self.sources) and self.copied[n] and valid.get(n, self.refs[n] is None):
            n += 1
        for tier in set(self.sources[:n]):
            self._stats.add("promoted_pages", self.sources[:n].count(tier), tier=tier)
        self._stats.add("promotion_misses", len(self.sources) - n)
        self._stats.add("promotions")
        self.seconds = (self.copies_ended or time.perf_counter()) - self._started
        self._stats.add("load_seconds", self.seconds)
        self._result = n
        return n
