"""EP = 1 with static shapes: tokens go to DeepGEMM's masked layout [E, capacity, D] and back, with no
host synchronisation, so a decode step can be captured in a CUDA graph (moe_pd/engine/cuda_graph.py).

Padding tokens of a graph's batch (marked False in `valid_T`) take no expert row. Needs the Triton ops
(moe_pd.kernels: masked layout, permute, unpermute; RoutedExperts runs the masked grouped GEMMs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult


@dataclass
class MaskedHandle:
    dest_TK: torch.Tensor
    """Row of each (token, k) in the flattened [E * capacity] layout (-1: none)."""
    topk_weights_TK: torch.Tensor


class MaskedLocalDispatcher(Dispatcher):
    def __init__(self, num_experts: int, capacity: int, valid_T: torch.Tensor | None = None) -> None:
        """`capacity` rows per expert (>= tokens per step: then no row is dropped); `valid_T` a static
        per-token mask the caller fills each step."""
        self.num_local_experts, self.capacity, self.valid_T = num_experts, capacity, valid_T

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        from moe_pd import kernels

        topk_ids_TK = self.to_physical(topk_ids_TK, layer)
        valid = None if self.valid_T is None else self.valid_T[: x_TD.shape[0]]
        dest_TK, masked_m_E = kernels.masked_layout(topk_ids_TK, self.num_local_experts, self.capacity, valid)
        x_ECD = kernels.permute(x_TD, dest_TK, self.num_local_experts * self.capacity)
        x_ECD = x_ECD.view(self.num_local_experts, self.capacity, x_TD.shape[1])
        return DispatchResult(x_ECD, masked_m_E, MaskedHandle(dest_TK, topk_weights_TK))

    def dispatch_wait(self, pending: DispatchResult) -> DispatchResult:
        return pending

    def combine_start(self, y_ECD, handle: MaskedHandle):
        from moe_pd import kernels

        return kernels.unpermute(y_ECD.reshape(-1, y_ECD.shape[-1]), handle.dest_TK, handle.topk_weights_TK)

    def combine_wait(self, pending: torch.Tensor) -> torch.Tensor:
        return pending
