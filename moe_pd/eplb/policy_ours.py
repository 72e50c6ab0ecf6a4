"""moe_pd's placement policy: DeepSeek's greedy placement, then local search, never worse.

Legend: L layers, E logical experts, P slots, G GPUs, k slots per GPU.

Within each placement domain (the whole cluster for the global policy, one node for the hierarchical
one, whose group-to-node packing is DeepSeek's) it:
1. replicates greedily (largest load per replica first), which minimises the largest replica load;
2. packs replicas onto GPUs with the same greedy rule as DeepSeek (heaviest first, lightest GPU with room);
3. refines the packing with swaps: repeatedly exchanges one replica of the most loaded GPU with one of
   another GPU when that lowers the larger of the two loads, best exchange first;
4. refines the replica counts: moves one replica from the expert that loses least by it to the hottest
   expert on the most loaded GPU, re-packs, and keeps the move only if the peak GPU load drops.
Every layer's result is compared with DeepSeek's on the same loads and the better one is kept, so it is
never worse by construction. Pure numpy on CPU; all of DeepSeek-V3's 58 layers at EP 144 plan in well
under a second.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from moe_pd.eplb import policy_deepseek
from moe_pd.eplb.metrics import gpu_loads

COUNT_MOVES = 12
SWAP_ROUNDS_PER_GPU = 4


def _replicate(w: np.ndarray, slots: int) -> np.ndarray:
    counts = np.ones(len(w), dtype=np.int64)
    heap = [(-w[e], e) for e in range(len(w))]
    heapq.heapify(heap)
    for _ in range(slots - len(w)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-w[e] / counts[e], e))
    return counts


def _pack(items_load: np.ndarray, gpus: int) -> np.ndarray:
    """Greedy: heaviest item first into the lightest GPU with room. Returns GPU index per item."""
    per_gpu = len(items_load) // gpus
    order = np.argsort(-items_load, kind="stable")
    heap = [(0.0, g) for g in range(gpus)]
    filled = [0] * gpus
    owner = np.empty(len(items_load), dtype=np.int64)
    for i in order:
        load, g = heapq.heappop(heap)
        owner[i] = g
        filled[g] += 1
        if filled[g] < per_gpu:
            heapq.heappush(heap, (load + items_load[i], g))
    return owner


def _swap_refine(items_load: np.ndarray, owner: np.ndarray, gpus: int) -> np.ndarray:
    """Best-improvement swaps between the most loaded GPU and any other; returns the new owner array."""
    per_gpu = len(items_load) // gpus
    slots = np.argsort(owner, kind="stable").reshape(gpus, per_gpu)  # item ids per GPU
    for _ in range(SWAP_ROUNDS_PER_GPU * gpus):
        loads_G = items_load[slots].sum(1)
        top = int(np.argmax(loads_G))
        a = items_load[slots[top]]  # [k]
        b = items_load[slots]  # [G, k]
        delta = a[None, :, None] - b[:, None, :]  # [G, k_top, k_other]: load moved off the top GPU
        new_top = loads_G[top] - delta
        new_other = loads_G[:, None, None] + delta
        worst = np.maximum(new_top, new_other)
        worst[top] = np.inf
        worst[delta <= 0] = np.inf
        g, i, j = np.unravel_index(np.argmin(worst), worst.shape)
        if not worst[g, i, j] < loads_G[top] - 1e-12:
            break
        slots[top, i], slots[g, j] = slots[g, j], slots[top, i]
    out = np.empty_like(owner)
    out[slots.reshape(-1)] = np.repeat(np.arange(gpus), per_gpu)
    return out


def _layout(w: np.ndarray, counts: np.ndarray, gpus: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(expert of each replica item, GPU of each item, peak GPU load) for given replica counts."""
    experts = np.repeat(np.arange(len(w)), counts)
    items_load = (w / counts)[experts]
    owner = _swap_refine(items_load, _pack(items_load, gpus), gpus)
    peak = np.bincount(owner, weights=items_load, minlength=gpus).max()
    return experts, owner, float(peak)


def _place_domain(w: np.ndarray, slots: int, gpus: int) -> np.ndarray:
    """Expert (domain-local id) of every slot, GPU-major: [slots]."""
    counts = _replicate(w, slots)
    experts, owner, peak = _layout(w, counts, gpus)
    for _ in range(COUNT_MOVES):
        per_replica = w / counts
        donors = np.where(counts > 1, w / np.maximum(counts - 1, 1), np.inf)
        donor = int(np.argmin(donors))
        loads = np.bincount(owner, weights=per_replica[experts], minlength=gpus)
        on_top = experts[owner == np.argmax(loads)]
        receiver = int(on_top[np.argmax(per_replica[on_top])])
        if donor == receiver or not np.isfinite(donors[donor]):
            break
        trial = counts.copy()
        trial[donor] -= 1
        trial[receiver] += 1
        t_experts, t_owner, t_peak = _layout(w, trial, gpus)
        if t_peak >= peak - 1e-12:
            break
        counts, experts, owner, peak = trial, t_experts, t_owner, t_peak
    order = np.lexsort((experts, owner))  # GPU-major, experts ascending inside a GPU
    return experts[order]


def replica_ranks(phy2log_LP: torch.Tensor, num_log: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers, slots = phy2log_LP.shape
    rank = torch.zeros_like(phy2log_LP)
    logcnt = torch.zeros(layers, num_log, dtype=torch.int64)
    for layer in range(layers):
        seen = np.zeros(num_log, dtype=np.int64)
        row = phy2log_LP[layer].numpy()
        ranks = np.empty(slots, dtype=np.int64)
        for p, e in enumerate(row):
            ranks[p] = seen[e]
            seen[e] += 1
        rank[layer] = torch.from_numpy(ranks)
        logcnt[layer] = torch.from_numpy(seen)
    return rank, logcnt


def rebalance(weight_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    weight_LE = weight_LE.float().cpu()
    layers, num_log = weight_LE.shape
    ds_phy2log, ds_rank, ds_cnt = policy_deepseek.rebalance(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    hierarchical = num_groups % num_nodes == 0
    nodes = num_nodes if hierarchical else 1
    slots_per_node, gpus_per_node = num_replicas // nodes, num_gpus // nodes
    phy2log = torch.empty(layers, num_replicas, dtype=torch.int64)
    w_all = weight_LE.double().numpy()
    for layer in range(layers):
        # Node membership of experts: DeepSeek's group packing (kept), read off its placement.
        node_experts = [np.unique(ds_phy2log[layer, n * slots_per_node:(n + 1) * slots_per_node].numpy())
                        for n in range(nodes)]
        for n, experts in enumerate(node_experts):
            local = _place_domain(w_all[layer, experts], slots_per_node, gpus_per_node)
            phy2log[layer, n * slots_per_node:(n + 1) * slots_per_node] = torch.from_numpy(experts[local])
    rank, logcnt = replica_ranks(phy2log, num_log)
    ours_peak = gpu_loads(weight_LE, phy2log, logcnt, num_gpus).max(-1).values
    ds_peak = gpu_loads(weight_LE, ds_phy2log, ds_cnt, num_gpus).max(-1).values
    worse = ours_peak > ds_peak
    phy2log[worse], rank[worse], logcnt[worse] = ds_phy2log[worse], ds_rank[worse], ds_cnt[worse]
    return phy2log, rank, logcnt
