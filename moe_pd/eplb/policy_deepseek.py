"""DeepSeek's EPLB placement, reimplemented from its public description and
reference code (github.com/deepseek-ai/EPLB, eplb.py; DeepSeek-V3 technical report, arXiv:2412.19437).

Legend: L layers, E logical experts, P physical slots (num_replicas), G GPUs, N nodes.

Hierarchical (when groups divide evenly over nodes): pack expert groups onto nodes (balanced_packing),
replicate the hottest experts inside each node (replicate_experts), then pack each node's replicas onto
its GPUs by per-replica load. Global: the same with one group and one node. Greedy packing puts items in
descending weight order into the lightest pack that still has room; ties go to the lowest pack index.
The packing uses a heap (same choices as a linear scan, without its O(items x packs) cost).
"""

from __future__ import annotations

import heapq

import torch


def balanced_packing(weight_LX: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's X items into `num_packs` packs of exactly X / num_packs items: (pack_index, rank_in_pack)."""
    layers, items = weight_LX.shape
    per_pack = items // num_packs
    if per_pack * num_packs != items:
        raise ValueError(f"{items} items do not split into {num_packs} equal packs")
    if per_pack == 1:
        idx = torch.arange(items).expand(layers, -1)
        return idx.clone(), torch.zeros_like(idx)
    pack_index = torch.empty(layers, items, dtype=torch.int64)
    rank_in_pack = torch.empty(layers, items, dtype=torch.int64)
    for layer in range(layers):
        w = weight_LX[layer].tolist()
        order = sorted(range(items), key=lambda i: -w[i])
        heap = [(0.0, p) for p in range(num_packs)]
        filled = [0] * num_packs
        p_idx, p_rank = [0] * items, [0] * items
        for i in order:
            load, p = heapq.heappop(heap)
            p_idx[i], p_rank[i] = p, filled[p]
            filled[p] += 1
            if filled[p] < per_pack:
                heapq.heappush(heap, (load + w[i], p))
        pack_index[layer] = torch.tensor(p_idx)
        rank_in_pack[layer] = torch.tensor(p_rank)
    return pack_index, rank_in_pack


def replicate_experts(weight_LE: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adds replicas one at a time to the expert with the largest load per replica.
    Returns (phy2log [L, num_phy], replica rank of each slot, logcnt [L, E])."""
    layers, num_log = weight_LE.shape
    phy2log = torch.arange(num_phy).expand(layers, -1).clone()
    rank = torch.zeros(layers, num_phy, dtype=torch.int64)
    logcnt = torch.ones(layers, num_log, dtype=torch.int64)
    rows = torch.arange(layers)
    for i in range(num_log, num_phy):
        redundant = (weight_LE / logcnt).max(dim=-1).indices
        phy2log[:, i] = redundant
        rank[:, i] = logcnt[rows, redundant]
        logcnt[rows, redundant] += 1
    return phy2log, rank, logcnt


def _inverse(perm_LX: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm_LX)
    inv.scatter_(1, perm_LX, torch.arange(perm_LX.shape[1]).expand(perm_LX.shape[0], -1))
    return inv


def hierarchical(weight_LE: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    """Returns (phy2log [L, P], replica rank per slot [L, P], logcnt [L, E])."""
    layers, num_log = weight_LE.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. groups onto nodes; mlog = "meta-logical" ids, node-major
    tokens_per_group = weight_LE.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # 2. replicas inside each node
    tokens_per_mlog = weight_LE.gather(-1, mlog2log).view(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_phy // num_nodes)

    # 3. replicas onto the GPUs of each node
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, gpus_per_node)
    phy2pphy = pack * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1)
                 + torch.arange(0, num_log, num_log // num_nodes).view(1, -1, 1)).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance(weight_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """(phy2log, replica rank per slot, logcnt) by DeepSeek's policy choice: hierarchical when the groups
    divide over the nodes, else global (one group, one node)."""
    weight_LE = weight_LE.float().cpu()
    if num_groups % num_nodes == 0:
        return hierarchical(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    return hierarchical(weight_LE, num_replicas, 1, 1, num_gpus)
