"""Expert-parallel load balancing: load recording, placement policies, online rebalancing.

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` keeps DeepSeek EPLB's
contract: weight [L, E] load per logical expert; returns phy2log [L, num_replicas], log2phy
[L, E, max replicas] padded with -1, and logcnt [L, E].
"""

from __future__ import annotations

import torch

from moe_pd.eplb import policy_deepseek, policy_ours

POLICIES = ("ours", "deepseek")


def check_args(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    layers, experts = weight.shape
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be divisible by num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be divisible by num_nodes={num_nodes}")
    if num_replicas < experts:
        raise ValueError(f"num_replicas={num_replicas} must be >= the {experts} logical experts")
    if experts % num_groups:
        raise ValueError(f"{experts} experts do not split into num_groups={num_groups}")
    if num_groups % num_nodes == 0 and (num_replicas // num_nodes) < experts // num_nodes:
        raise ValueError("each node needs at least as many slots as the experts placed on it")


def log2phy_from(phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    layers, num_replicas = phy2log.shape
    width = int(logcnt.max())
    log2phy = torch.full((layers, logcnt.shape[1], width), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(-1, phy2log * width + phyrank,
                                      torch.arange(num_replicas, dtype=torch.int64).expand(layers, -1))
    return log2phy


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      policy: str = "ours") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Places `num_replicas` physical slots over `num_gpus` GPUs for every layer's load row."""
    check_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if policy == "deepseek":
        phy2log, phyrank, logcnt = policy_deepseek.rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus)
    elif policy == "ours":
        phy2log, phyrank, logcnt = policy_ours.rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        raise ValueError(f"policy={policy!r}: must be one of {POLICIES}")
    return phy2log, log2phy_from(phy2log, phyrank, logcnt), logcnt
