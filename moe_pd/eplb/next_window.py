"""Planning for the next window: forecast, few weight moves, and hysteresis against the current placement.

Legend: T windows, L layers, E logical experts, S scenarios, P slots, G GPUs, N nodes, k slots per GPU.

1. The load planned for is the forecast of the next window (forecast.py), not the last window.
2. A fresh plan labels its GPUs arbitrarily; any permutation of nodes, of GPUs inside a node and of slots
   inside a GPU balances the same. `align` picks the one that keeps the most experts where they already
   are (greedy matching on overlap: nodes, then GPUs, then slots, as vLLM keeps intra-GPU slots), so only
   experts that really change GPU move.
3. Hysteresis and move cost, per layer: the new plan replaces the current one only if its expected
   balancedness over the forecast's scenarios beats the current placement's by more than `min_gain` plus
   `move_cost` times the fraction of the layer's slots that must be fetched. A layer whose gain does not
   pay for its moves keeps its placement and moves nothing (SGLang's flash_lb also updates only the layers
   whose ratio fell, and the most improved first).
"""

from __future__ import annotations

import numpy as np
import torch

from moe_pd.eplb.forecast import Forecast


def _match(overlap: np.ndarray) -> np.ndarray:
    """new index -> old index, a permutation, greedily by decreasing overlap (ties: lower indices)."""
    n = overlap.shape[0]
    new_to_old = np.full(n, -1, dtype=np.int64)
    used = np.zeros(n, dtype=bool)
    flat = np.flatnonzero(overlap > 0)
    for idx in flat[np.argsort(-overlap.reshape(-1)[flat], kind="stable")]:
        a, b = divmod(int(idx), n)
        if new_to_old[a] < 0 and not used[b]:
            new_to_old[a], used[b] = b, True
    new_to_old[new_to_old < 0] = np.flatnonzero(~used)
    return new_to_old


def _presence(row_P: np.ndarray, gpus: int, experts: int) -> np.ndarray:
    """[G, E]: 1 where the GPU holds the expert."""
    a = np.zeros((gpus, experts))
    a[np.repeat(np.arange(gpus), len(row_P) // gpus), row_P] = 1.0
    return a


def _keep_slots(old_K: np.ndarray, new_K: np.ndarray) -> np.ndarray:
    """new_K reordered so that experts already in a slot of this GPU stay in that slot."""
    if np.array_equal(old_K, new_K):
        return new_K
    out = np.full(len(new_K), -1, dtype=np.int64)
    rest = list(new_K)
    for k, e in enumerate(old_K):
        if e in rest:
            out[k] = e
            rest.remove(e)
    out[out < 0] = rest
    return out


def align(current_P: np.ndarray, new_P: np.ndarray, gpus: int, nodes: int, experts: int) -> np.ndarray:
    """`new_P` with its nodes, GPUs and slots permuted to keep as many experts in place as possible."""
    per_gpu = len(new_P) // gpus
    gpn = gpus // nodes
    old_GE, new_GE = _presence(current_P, gpus, experts), _presence(new_P, gpus, experts)
    gpu_overlap = new_GE @ old_GE.T  # [G new, G old]
    node_overlap = gpu_overlap.reshape(nodes, gpn, nodes, gpn).sum((1, 3))
    node_map = _match(node_overlap) if nodes > 1 else np.zeros(1, dtype=np.int64)
    old_gpus = current_P.reshape(gpus, per_gpu)
    new_gpus = new_P.reshape(gpus, per_gpu)
    out = np.empty_like(old_gpus)
    for n_new, n_old in enumerate(node_map):
        block = gpu_overlap[n_new * gpn:(n_new + 1) * gpn, n_old * gpn:(n_old + 1) * gpn]
        for g_new, g_old in enumerate(_match(block)):
            src, dst = n_new * gpn + g_new, n_old * gpn + g_old
            out[dst] = _keep_slots(old_gpus[dst], new_gpus[src])
    return out.reshape(-1)


def fetched_slots(current_P: np.ndarray, new_P: np.ndarray, gpus: int, experts: int) -> int:
    """Slots whose expert is not already on that GPU (each needs a transfer)."""
    held_GE = _presence(current_P, gpus, experts)
    return int((held_GE[np.repeat(np.arange(gpus), len(new_P) // gpus), new_P] == 0).sum())


def expected_balancedness(scenarios_SE: np.ndarray, row_P: np.ndarray, gpus: int) -> float:
    """Mean over scenarios of mean / max GPU load with an even split over replicas."""
    counts = np.bincount(row_P, minlength=scenarios_SE.shape[1])
    per_slot_SP = (scenarios_SE / np.maximum(counts, 1))[:, row_P]
    loads_SG = per_slot_SP.reshape(len(scenarios_SE), gpus, -1).sum(-1)
    peak = loads_SG.max(-1)
    return float(np.where(peak > 0, loads_SG.mean(-1) / np.maximum(peak, 1e-30), 1.0).mean())


def decide(fc: Forecast, current_LP: torch.Tensor, new_LP: torch.Tensor, gpus: int, nodes: int,
           min_gain: float, move_cost: float) -> tuple[torch.Tensor, list[float]]:
    """Per layer, the aligned new plan where it pays for its moves, else the current one; and each
    layer's expected gain (0 where kept)."""
    cur, new = current_LP.numpy(), new_LP.numpy()
    experts = fc.mean_LE.shape[1]
    out = cur.copy()
    gains = []
    for layer in range(cur.shape[0]):
        aligned = align(cur[layer], new[layer], gpus, nodes, experts)
        scen = fc.scenarios_LSE[layer]
        gain = expected_balancedness(scen, aligned, gpus) - expected_balancedness(scen, cur[layer], gpus)
        moved = fetched_slots(cur[layer], aligned, gpus, experts) / cur.shape[1]
        if moved > 0 and gain > min_gain + move_cost * moved:
            out[layer] = aligned
            gains.append(gain)
        else:
            gains.append(0.0)
    return torch.from_numpy(out), gains
