"""Run-time routing among replicas: each step's tokens of a replicated expert are split over its replicas
so that the step's per-GPU load is balanced, on the device, identically on every rank.

Legend: L layers (a leading batch dimension, 1 at run time), E logical experts, P physical slots,
X max replicas per expert, G GPUs (ranks), T tokens, K top-k.

A placement fixes which GPUs hold an expert; how its tokens divide among them is free, and it never changes
the math (every replica holds the same weights). DeepSeek's LPLB solves a small linear program per batch for
that split; here it is water-filling: starting from an even split, every replicated expert pours its step
count over its replicas so that they end level with the lowest of their GPUs' other loads. That best
response minimises the sum of squared GPU loads over the expert's GPUs, so all experts' responses together
point downhill for the sum of squares over all GPUs; each sweep moves along them by the step that minimises
it exactly (it is quadratic along the line; the step stays in [0, 1], so shares stay between the old and
the responses). A fixed number of sweeps keeps every rank's work the same, and a layer keeps the even split
in the rare case it has the lower peak.
The inputs are the gate's counts summed over the EP group (one all_reduce of E integers per layer), so every
rank computes the same split. Each rank then sends its own tokens of an expert to the replicas in those
proportions: its j-th token of the expert takes the replica whose cumulative share first passes
(j + 1/2) / n + rank * golden ratio (mod 1), so each rank's split is within one token of the share and the
ranks' rounding errors do not pile up on one replica.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SWEEPS = 8
_GOLDEN = 0.6180339887498949


def replica_shares(counts_LE: torch.Tensor, phy2log_LP: torch.Tensor, log2phy_LEX: torch.Tensor,
                   num_gpus: int, sweeps: int = SWEEPS) -> torch.Tensor:
    """Tokens per slot [L, P] (float): every expert's count split over its replicas to level the GPUs."""
    layers, slots = phy2log_LP.shape
    counts_LE = counts_LE.to(torch.float32)
    valid_LEX = log2phy_LEX >= 0
    logcnt_LE = valid_LEX.sum(-1).clamp(min=1)
    share_LP = (counts_LE / logcnt_LE).gather(1, phy2log_LP)
    slot_gpu_P = torch.arange(slots, device=phy2log_LP.device) // (slots // num_gpus)
    idx_LEX = log2phy_LEX.clamp(min=0)
    per_gpu = lambda x_LP: torch.zeros(layers, num_gpus, device=x_LP.device).index_add_(1, slot_gpu_P, x_LP)
    even_LP = share_LP
    pad = 1e30
    for _ in range(sweeps):
        gpu_LG = per_gpu(share_LP)
        other_LP = gpu_LG[:, slot_gpu_P] - share_LP  # load of the slot's GPU without this slot's share
        base_LEX = torch.where(valid_LEX, other_LP.gather(1, idx_LEX.flatten(1)).view_as(idx_LEX), pad)
        sorted_LEX, _ = base_LEX.sort(-1)
        k_X = torch.arange(1, sorted_LEX.shape[-1] + 1, device=sorted_LEX.device, dtype=torch.float32)
        level_LEX = (counts_LE[..., None] + sorted_LEX.cumsum(-1)) / k_X  # level if the k lowest are filled
        fits_LEX = (level_LEX >= sorted_LEX) & (sorted_LEX < pad)
        k_LE = fits_LEX.sum(-1).clamp(min=1)  # fits holds for a prefix of k
        level_LE = level_LEX.gather(-1, (k_LE - 1)[..., None]).squeeze(-1)
        target_LEX = torch.where(valid_LEX, (level_LE[..., None] - base_LEX).clamp(min=0), 0.0)
        target_LP = torch.zeros_like(share_LP).scatter_add_(1, idx_LEX.flatten(1),
                                                            target_LEX.flatten(1) * valid_LEX.flatten(1))
        # exact line search on the sum of squared GPU loads, which is quadratic along the step
        step_LP = target_LP - share_LP
        d_LG = per_gpu(step_LP)
        a_L1 = (-(gpu_LG * d_LG).sum(-1, keepdim=True) / (d_LG * d_LG).sum(-1, keepdim=True).clamp(min=1e-30))
        share_LP = share_LP + a_L1.clamp(0.0, 1.0) * step_LP
    better_L1 = per_gpu(share_LP).max(-1, keepdim=True).values <= per_gpu(even_LP).max(-1, keepdim=True).values
    return torch.where(better_L1, share_LP, even_LP)


def gpu_loads_routed(counts_LE: torch.Tensor, phy2log_LP: torch.Tensor, log2phy_LEX: torch.Tensor,
                     num_gpus: int, sweeps: int = SWEEPS) -> torch.Tensor:
    """Per-GPU load [L, G] with replica routing."""
    share_LP = replica_shares(counts_LE, phy2log_LP, log2phy_LEX, num_gpus, sweeps)
    return share_LP.view(share_LP.shape[0], num_gpus, -1).sum(-1)


def assign_replicas(topk_ids_TK: torch.Tensor, share_P: torch.Tensor, log2phy_EX: torch.Tensor,
                    salt: int = 0) -> torch.Tensor:
    """This rank's logical ids -> physical slots following the per-slot shares; -1 stays -1."""
    valid = topk_ids_TK >= 0
    num_logical = log2phy_EX.shape[0]
    ids = topk_ids_TK.clamp(min=0)
    keys = torch.where(valid, ids, num_logical).reshape(-1)
    order = torch.sort(keys, stable=True).indices
    local_E1 = torch.bincount(keys, minlength=num_logical + 1)
    starts = torch.cumsum(local_E1, 0) - local_E1
    occurrence = torch.empty_like(keys)
    occurrence[order] = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
    slot_share_EX = torch.where(log2phy_EX >= 0, share_P[log2phy_EX.clamp(min=0)], 0.0)
    cum_EX = slot_share_EX.cumsum(-1) / slot_share_EX.sum(-1, keepdim=True).clamp(min=1e-30)
    flat = ids.reshape(-1)
    pos = ((occurrence.to(torch.float64) + 0.5) / local_E1[keys].clamp(min=1) + salt * _GOLDEN) % 1.0
    replica = (pos[:, None] >= cum_EX[flat].to(torch.float64)).sum(-1)
    replica = torch.minimum(replica, (log2phy_EX[flat] >= 0).sum(-1) - 1)
    phys = log2phy_EX[flat, replica].view_as(ids)
    return torch.where(valid, phys, -1)


class ReplicaRouter:
    """The dispatcher's replica choice for eplb.routing='balanced' (placement.py keeps 'static' and 'dynamic')."""

    def __init__(self, state=None) -> None:
        """`state`: the rank's ParallelState (None: one process). Its group is read at each call, never kept:
        parallel.state.shutdown drops the state's group, and a group kept alive past it can abort the process
        at exit (see join_process_group)."""
        self.state = state

    def route(self, topk_ids_TK: torch.Tensor, placement, layer: int) -> torch.Tensor:
        """`placement`'s maps on the ids' device (Dispatcher.to_physical moves them there)."""
        row = layer - placement.first_layer
        ids = topk_ids_TK.reshape(-1)
        counts_E = torch.bincount(ids[ids >= 0], minlength=placement.num_logical)
        if self.state is not None and self.state.ep_size > 1:
            dist.all_reduce(counts_E, group=self.state.group)
        share_P = replica_shares(counts_E[None], placement.phy2log_LP[row:row + 1],
                                 placement.log2phy_LEX[row:row + 1], placement.num_ranks)[0]
        rank = self.state.ep_rank if self.state is not None else 0
        return assign_replicas(topk_ids_TK, share_P, placement.log2phy_LEX[row], rank)
