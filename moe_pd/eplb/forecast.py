"""Next-window load forecast with its uncertainty, from a history of load windows.

Legend: T windows (oldest first), L MoE layers, E logical experts, S scenarios.

Planning serves the next window, not the past one. Per layer, loads are turned into shares of the window's
total (the total does not change balancedness), and three exponentially weighted forecasts are back-tested
on the history: the last window alone (best for a random walk) and averages with half-lives of 1 and 3
windows (better when loads revert or burst). Each layer keeps the one with the smallest past error.

The uncertainty is empirical: every past window gives one residual, the log ratio of what came to what
was forecast (a pseudo count of one token keeps idle experts finite). The scenarios of the next window are
the forecast times each past residual, renormalised: they carry the size of the drift, its bursts and the
co-variation of experts (experts that rose together in the past rise together in every scenario), without
fitting a model. With one window there is no residual and the only scenario is the last window.
DeepSeek's EPLB leaves prediction to the user and suggests a moving average of history
(github.com/deepseek-ai/EPLB); SGLang's flash_lb plans from a window's mean plus z standard deviations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HALF_LIVES = (0.0, 1.0, 3.0)
"""Candidate EWMA half-lives in windows; 0 is the last window alone."""
MAX_SCENARIOS = 16


@dataclass
class Forecast:
    mean_LE: np.ndarray
    """Forecast share of each expert in the next window (rows sum to 1; zero rows stay zero)."""
    scenarios_LSE: np.ndarray
    """Plausible next-window shares; scenario 0 is the forecast itself."""
    half_life_L: np.ndarray
    """Half-life each layer's forecast uses."""


def _shares(history_TLE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total_TL1 = history_TLE.sum(-1, keepdims=True)
    return history_TLE / np.maximum(total_TL1, 1e-12), np.maximum(total_TL1, 1.0)


def _ewma(shares_TLE: np.ndarray, half_life: float) -> np.ndarray:
    """Forecast after each window: [T, L, E], row t uses windows 0..t."""
    if half_life == 0:
        return shares_TLE
    keep = 0.5 ** (1.0 / half_life)
    out = np.empty_like(shares_TLE)
    acc = shares_TLE[0]
    out[0] = acc
    for t in range(1, len(shares_TLE)):
        acc = keep * acc + (1 - keep) * shares_TLE[t]
        out[t] = acc
    return out


def forecast(history_TLE: np.ndarray) -> Forecast:
    """Forecast and scenarios of the next window from `history_TLE` (float counts, oldest first)."""
    history_TLE = np.asarray(history_TLE, dtype=np.float64)
    windows, layers, experts = history_TLE.shape
    shares_TLE, total_TL1 = _shares(history_TLE)
    if windows == 1:
        return Forecast(shares_TLE[0], shares_TLE[0][:, None], np.zeros(layers))
    fits = [_ewma(shares_TLE, h) for h in HALF_LIVES]
    errors_HL = np.stack([np.abs(f[:-1] - shares_TLE[1:]).sum(-1).mean(0) for f in fits])
    best_L = np.argmin(errors_HL, axis=0)  # ties keep the shortest memory
    rows = np.arange(layers)
    chosen_TLE = np.stack(fits)[best_L, :, rows].transpose(1, 0, 2)  # [T, L, E]
    mean_LE = chosen_TLE[-1]
    eps_TL1 = 1.0 / total_TL1
    residual_TLE = (np.log(shares_TLE[1:] + eps_TL1[1:]) - np.log(chosen_TLE[:-1] + eps_TL1[1:]))[-MAX_SCENARIOS:]
    scen_SLE = mean_LE[None] * np.exp(residual_TLE)
    scen_SLE /= np.maximum(scen_SLE.sum(-1, keepdims=True), 1e-12)
    scenarios_LSE = np.concatenate([mean_LE[None], scen_SLE]).transpose(1, 0, 2)
    return Forecast(mean_LE, scenarios_LSE, np.asarray(HALF_LIVES)[best_L])
