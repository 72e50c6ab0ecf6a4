"""Expert-parallel load balancing: load recording, placement policies, online rebalancing.

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` keeps DeepSeek EPLB's
contract: weight [L, E] load per logical expert; returns phy2log [L, num_replicas], log2phy
[L, E, max replicas] padded with -1, and logcnt [L, E]. `weight` may also be a history of load windows
[T, L, E], oldest first: policy "ours" then plans for its forecast of the next window, "deepseek" for the
last window. With `current` (the phy2log in service), either policy also keeps each layer's current placement
unless the new one is expected to gain more than `min_gain` + `move_cost` x (fraction of slots fetched),
and labels its GPUs so that as few experts as possible move (next_window.py).
"""

from __future__ import annotations

import torch

from moe_pd.eplb import policy_deepseek, policy_ours
from moe_pd.eplb.forecast import forecast
from moe_pd.eplb.next_window import decide

POLICIES = ("ours", "deepseek")


def check_args(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if weight.dim() not in (2, 3) or weight.shape[0] == 0:
        raise ValueError(f"weight must be [layers, experts] or [windows, layers, experts], got {tuple(weight.shape)}")
    experts = weight.shape[-1]
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
                      policy: str = "ours", current: torch.Tensor | None = None, min_gain: float = 0.0,
                      move_cost: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Places `num_replicas` physical slots over `num_gpus` GPUs for every layer's load row (or history)."""
    check_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: must be one of {POLICIES}")
    history = weight if weight.dim() == 3 else weight[None]
    if policy == "deepseek":
        phy2log, phyrank, logcnt = policy_deepseek.rebalance(history[-1], num_replicas, num_groups, num_nodes,
                                                             num_gpus)
        if current is None:
            return phy2log, log2phy_from(phy2log, phyrank, logcnt), logcnt
    fc = forecast(history.double().cpu().numpy())
    if policy == "ours":
        load = torch.from_numpy(fc.mean_LE).float() if history.shape[0] > 1 else history[-1].float()
        phy2log, phyrank, logcnt = policy_ours.rebalance(load, num_replicas, num_groups, num_nodes, num_gpus)
    if current is not None:
        if tuple(current.shape) != tuple(phy2log.shape):
            raise ValueError(f"current placement {tuple(current.shape)} does not match {tuple(phy2log.shape)}")
        nodes = num_nodes if num_groups % num_nodes == 0 else 1
        phy2log, _ = decide(fc, current.long().cpu(), phy2log, num_gpus, nodes, min_gain, move_cost)
        phyrank, logcnt = policy_ours.replica_ranks(phy2log, history.shape[-1])
    return phy2log, log2phy_from(phy2log, phyrank, logcnt), logcnt
