"""Synthetic expert-load windows that drift, for planning benchmarks and tests.

Legend: T windows, L MoE layers, E logical experts.

Each layer has a base popularity: Zipf with exponent `zipf` (the expert of rank r gets 1 / r**zipf) over a
random permutation of the experts. An expert's log-popularity then walks from window to window:

    x[t+1] = base + (1 - reversion) * (x[t] - base) + sigma * N(0, 1)

so `sigma` is the per-window log-normal drift (0.2: a typical expert's load moves by about 20% per
window), `group_sigma` adds a step shared by all experts of a group (experts that co-vary, as
group-limited routing makes them), and `reversion` pulls it back toward the base (0: a pure random
walk, whose best forecast is the last window; 1: no memory at all). A burst turns one expert of a layer
suddenly hot: with probability `burst_rate` per layer and window, a random expert's popularity is
multiplied by `burst_gain` for `burst_windows` windows, then drops back. Popularities are normalised
per layer and the window's (token, expert) pair counts are Poisson with mean `tokens` * popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DriftSpec:
    name: str
    zipf: float = 1.0
    """Exponent of the base popularity: the expert of rank r gets 1 / r**zipf."""
    sigma: float = 0.2
    """Standard deviation of each expert's per-window log-popularity step."""
    reversion: float = 0.0
    """Fraction of the log deviation from the base popularity removed each window (0: random walk)."""
    group_sigma: float = 0.0
    """Standard deviation of a log-popularity step shared by all experts of a group (co-variation)."""
    groups: int = 8
    """Expert groups (DeepSeek-V3: 8) that `group_sigma` moves together."""
    burst_rate: float = 0.0
    """Per layer and window, the probability that one random expert turns hot."""
    burst_gain: float = 8.0
    """A burst multiplies the expert's popularity by this."""
    burst_windows: int = 3
    """Windows a burst lasts."""
    tokens: int = 1 << 18
    """Mean (token, expert) pairs per layer per window; counts are Poisson around it."""


def drift_windows(spec: DriftSpec, windows: int, layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Load windows [T, L, E] (float64 counts, oldest first) drawn from `spec`."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, experts + 1, dtype=np.float64)
    base_LE = np.stack([np.log(1.0 / ranks**spec.zipf)[rng.permutation(experts)] for _ in range(layers)])
    x_LE = base_LE.copy()
    burst_left_LE = np.zeros((layers, experts), dtype=np.int64)
    out = np.empty((windows, layers, experts))
    for t in range(windows):
        if t:
            step_LE = spec.sigma * rng.standard_normal(x_LE.shape)
            if spec.group_sigma > 0:
                step_LE += np.repeat(spec.group_sigma * rng.standard_normal((layers, spec.groups)),
                                     experts // spec.groups, axis=1)
            x_LE = base_LE + (1 - spec.reversion) * (x_LE - base_LE) + step_LE
            burst_left_LE = np.maximum(burst_left_LE - 1, 0)
        if spec.burst_rate > 0:
            start = rng.random(layers) < spec.burst_rate
            which = rng.integers(0, experts, layers)
            burst_left_LE[start, which[start]] = spec.burst_windows
        logits = x_LE + np.log(spec.burst_gain) * (burst_left_LE > 0)
        p_LE = np.exp(logits - logits.max(-1, keepdims=True))
        p_LE /= p_LE.sum(-1, keepdims=True)
        out[t] = rng.poisson(spec.tokens * p_LE)
    return torch.from_numpy(out)
