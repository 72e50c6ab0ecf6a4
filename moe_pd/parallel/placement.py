"""Physical expert placement: which rank's slot holds which logical expert, per MoE layer.

Legend: L MoE layers, E logical experts, P physical slots (E + redundant), X max replicas per expert.
Slot p lives on rank p // (P / ranks). The gate picks logical ids; `route` turns them into physical
slots before the dispatcher counts rows, so replicas share a hot expert's load. Maps follow DeepSeek's
EPLB contract (phy2log, log2phy padded with -1, logcnt); the default placement below is contiguous with
the redundant slots replicating experts 0, 1, ... in order (EPLB computes better ones from load stats).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    phy2log_LP: torch.Tensor
    log2phy_LEX: torch.Tensor
    logcnt_LE: torch.Tensor
    num_ranks: int
    first_layer: int = 0
    """Model layer index of MoE layer 0 (DeepSeek: first_k_dense_replace)."""

    @property
    def num_slots(self) -> int:
        return self.phy2log_LP.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def num_logical(self) -> int:
        return self.logcnt_LE.shape[1]

    def to(self, device: torch.device | str) -> "ExpertPlacement":
        """The same placement with its maps on `device` (routing indexes them with the gate's ids)."""
        return replace(self, phy2log_LP=self.phy2log_LP.to(device), log2phy_LEX=self.log2phy_LEX.to(device),
                       logcnt_LE=self.logcnt_LE.to(device))

    def rank_experts(self, rank: int, layer: int) -> list[int]:
        """Logical expert held by each of `rank`'s slots in model layer `layer`, in slot order."""
        s = self.slots_per_rank
        return self.phy2log_LP[layer - self.first_layer, rank * s : (rank + 1) * s].tolist()

    def route(self, topk_ids_TK: torch.Tensor, layer: int, dynamic: bool = False, salt: int = 0) -> torch.Tensor:
        """Logical -> physical ids in model layer `layer`; -1 stays -1.

        static: the (token, k) pair at flat position n takes replica n % (replica count), as vLLM does.
        dynamic: the j-th pair routed to an expert in this batch takes replica (j + salt) % count, which
        splits each expert's tokens evenly over its replicas (salt = the rank, so ranks start apart).
        """
        layer -= self.first_layer
        if self.num_slots == self.num_logical and bool((self.logcnt_LE[layer] == 1).all()):
            return torch.where(topk_ids_TK >= 0, self.log2phy_LEX[layer, topk_ids_TK.clamp(min=0), 0], -1)
        valid = topk_ids_TK >= 0
        ids = topk_ids_TK.clamp(min=0)
        if dynamic:
            keys = torch.where(valid, ids, self.num_logical).reshape(-1)
            order = torch.sort(keys, stable=True).indices
            counts = torch.bincount(keys, minlength=self.num_logical + 1)
            starts = torch.cumsum(counts, 0) - counts
            occurrence = torch.empty_like(keys)
            occurrence[order] = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
            flat = occurrence.view_as(ids) + salt
        else:
            flat = torch.arange(ids.numel(), device=ids.device).view_as(ids)
        replica = flat % self.logcnt_LE[layer, ids]
        phys = self.log2phy_LEX[layer, ids, replica]
        return torch.where(valid, phys, -1)

    @staticmethod
    def from_phy2log(phy2log_LP: torch.Tensor, num_logical: int, num_ranks: int,
                     first_layer: int = 0) -> "ExpertPlacement":
        layers, slots = phy2log_LP.shape
        if slots % num_ranks:
            raise ValueError(f"{slots} physical slots do not split over {num_ranks} ranks")
        logcnt = torch.zeros(layers, num_logical, dtype=torch.int64)
        logcnt.scatter_add_(1, phy2log_LP, torch.ones_like(phy2log_LP))
        if bool((logcnt == 0).any()):
            raise ValueError("every logical expert needs at least one physical slot")
        log2phy = torch.full((layers, num_logical, int(logcnt.max())), -1, dtype=torch.int64)
        for layer in range(layers):
            seen = [0] * num_logical
            for p, e in enumerate(phy2log_LP[layer].tolist()):
                log2phy[layer, e, seen[e]] = p
                seen[e] += 1
        return ExpertPlacement(phy2log_LP.long(), log2phy, logcnt, num_ranks, first_layer)

    @staticmethod
    def contiguous(num_layers: int, num_logical: int, num_redundant: int, num_ranks: int,
                   first_layer: int = 0) -> "ExpertPlacement":
        base = torch.arange(num_logical + num_redundant) % num_logical
        return ExpertPlacement.from_phy2log(base.expand(max(num_layers, 1), -1).clone(), num_logical, num_ranks,
                                            first_layer)
