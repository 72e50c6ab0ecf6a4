"""EP = 1: every expert is local, so dispatch is a permutation and combine a weighted scatter-add.

Legend: T tokens, D hidden, K top-k, N = valid (token, expert) pairs, E experts.
This is the reference every other backend is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult


@dataclass
class LocalHandle:
    token_index_N: torch.Tensor
    weights_N: torch.Tensor
    num_tokens: int


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

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK):
        order, counts_E, num_valid = group_by_expert(topk_ids_TK, self.num_local_experts)
        order = order[:num_valid]
        token_index_N = order // topk_ids_TK.shape[1]
        handle = LocalHandle(token_index_N, topk_weights_TK.reshape(-1)[order], x_TD.shape[0])
        return DispatchResult(x_TD[token_index_N], counts_E, handle)

    def dispatch_wait(self, pending: DispatchResult) -> DispatchResult:
        return pending

    def combine_start(self, y_ND, handle: LocalHandle):
        out_TD = y_ND.new_zeros(handle.num_tokens, y_ND.shape[1])
        out_TD.index_add_(0, handle.token_index_N, y_ND * handle.weights_N[:, None].to(y_ND.dtype))
        return out_TD

    def combine_wait(self, pending: torch.Tensor) -> torch.Tensor:
        return pending
