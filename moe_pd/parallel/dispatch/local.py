"""EP = 1: every expert is local, so dispatch is a permutation and combine a weighted scatter-sum.

Legend: T tokens, D hidden, K top-k, N = valid (token, expert) pairs, E experts.
This is the reference every other backend is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult, weighted_scatter_sum


@dataclass
class LocalHandle:
    slot_N: torch.Tensor
    """Flat (token * K + k) position of each dispatched row."""
    topk_weights_TK: torch.Tensor


def group_by_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (flat (token, k) positions sorted by expert, stable; counts per expert; number valid).

    -1 entries sort after every expert and are cut off by the caller with the valid count.
    """
    flat_K = topk_ids_TK.reshape(-1)
    valid = flat_K >= 0
    keys = torch.where(valid, flat_K, torch.full_like(flat_K, num_experts))
    order = torch.sort(keys, stable=True).indices
    counts_E = torch.bincount(flat_K[valid], minlength=num_experts)
    return order, counts_E, int(valid.sum())


class LocalDispatcher(Dispatcher):
    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        topk_ids_TK = self.to_physical(topk_ids_TK, layer)
        order, counts_E, num_valid = group_by_expert(topk_ids_TK, self.num_local_experts)
        slot_N = order[:num_valid]
        handle = LocalHandle(slot_N, topk_weights_TK)
        return DispatchResult(x_TD[slot_N // topk_ids_TK.shape[1]], counts_E, handle)

    def dispatch_wait(self, pending: DispatchResult) -> DispatchResult:
        return pending

    def combine_start(self, y_ND, handle: LocalHandle):
        return weighted_scatter_sum(y_ND, handle.slot_N, handle.topk_weights_TK)

    def combine_wait(self, pending: torch.Tensor) -> torch.Tensor:
        return pending
