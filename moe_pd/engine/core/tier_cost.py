"""Load a prefix from the KV tiers, or recompute it: the scheduler's cost model (no torch).

A page found in host DRAM or on disk is worth promoting only when copying it up takes less time than
prefilling its tokens again, so that a tier hit never costs more than a recompute. Both rates are measured
as the engine runs, with exponential forgetting: seconds per promoted page by the tier it came from (from
a promotion's start to the end of its copies, so queueing behind other promotions counts), and the
marginal prefill seconds per token, the slope of a least-squares line through the prefill steps' (tokens,
seconds): a step has a fixed cost (launches, the decodes beside it, the all-to-all's latency) that
recomputing a prefix does not add to. The priors only decide the first admissions; a tier whose loads
are declined is still loaded once every `probe_every` declines, so its estimate follows the machine.

A promoting request joins the step after the one that admitted it (its copies run during that step); a
recompute would have lengthened that step for every request in it instead.

The same arithmetic is meant to decide a cross-node prefix fetch (bytes over the link against prefill
FLOPs, both as measured seconds; the "remote" prior); that fetch is not built yet (docs/kv_tiers.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MIN_MARGINAL_SHARE = 0.1
"""The marginal prefill seconds per token are at least this share of the mean seconds per token."""
PRIOR_SECONDS_PER_PAGE = {"dram": 1e-4, "disk": 1e-3, "remote": 2e-3}
"""Before any measurement: a DRAM page ~0.1 ms, a disk page ~1 ms, a page from another node ~2 ms."""


@dataclass
class LoadOrCompute:
    seconds_per_page: dict[str, float] = field(default_factory=lambda: dict(PRIOR_SECONDS_PER_PAGE))
    """Measured seconds to promote one page, by the tier it comes from."""
    seconds_per_token: float = 1e-4
    """Measured prefill seconds per token."""
    alpha: float = 0.2
    """Weight of the newest observation in the moving averages."""
    probe_every: int = 8
    """Every this many declined loads, one is taken anyway: a tier's estimate comes only from loads, so
    without probes one slow measurement (a loaded machine) would keep it declined for good."""
    _declined: int = 0
    _moments: tuple[float, float, float, float] | None = None
    """Moving means of tokens, seconds, tokens^2 and tokens x seconds over the prefill steps."""

    def load_seconds(self, sources: Sequence[str]) -> float:
        return sum(self.seconds_per_page.get(t, PRIOR_SECONDS_PER_PAGE["remote"]) for t in sources)

    def pages_worth_loading(self, sources: Sequence[str], block_size: int) -> int:
        """How many leading pages of a run found in the tiers (`sources`: the tier of each page, in chain
        order) to promote: the count that saves the most time (prefill of their tokens minus their load);
        0: recompute them all."""
        best, best_k, load = 0.0, 0, 0.0
        for i, tier in enumerate(sources):
            load += self.seconds_per_page.get(tier, PRIOR_SECONDS_PER_PAGE["remote"])
            saved = (i + 1) * block_size * self.seconds_per_token - load
            if saved > best:
                best, best_k = saved, i + 1
        if best_k == 0 and sources:
            self._declined += 1
            if self._declined >= self.probe_every:  # re-measure
                self._declined = 0
                return len(sources)
        return best_k

    def observe_load(self, sources: Sequence[str], seconds: float) -> None:
        """A promotion of pages from `sources` took `seconds`: every tier it used is scaled towards the
        ratio of the measured time to the predicted one."""
        predicted = self.load_seconds(sources)
        if not sources or predicted <= 0 or seconds <= 0:
            return
        ratio = seconds / predicted
        for tier in set(sources):
            self.seconds_per_page[tier] *= (1 - self.alpha) + self.alpha * ratio

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill step of `tokens` took `seconds`: refits the marginal seconds per token (the line's slope;
        while the steps are too alike in size to fit one, their mean seconds per token)."""
        if tokens <= 0 or seconds <= 0:
            return
        new = (tokens, seconds, tokens * tokens, tokens * seconds)
        m = new if self._moments is None else tuple(a + self.alpha * (b - a) for a, b in zip(self._moments, new))
        self._moments = m
        n, s, nn, ns = m
        spread = nn - n * n
        slope = (ns - n * s) / spread if spread > 0.01 * n * n else 0.0
        # a fit over a few noisy steps can put the slope near zero; a token never costs less than a tenth
        # of the mean (a step is not 90% fixed cost), so noise does not decline loads 10-100x cheaper
        self.seconds_per_token = max(slope, MIN_MARGINAL_SHARE * s / n) if slope > 0 else s / n
