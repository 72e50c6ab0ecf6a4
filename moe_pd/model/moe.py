"""MoE block: gate -> dispatcher -> routed experts -> dispatcher -> + shared experts.

Legend: T tokens, D hidden, K top-k. The block knows nothing about ranks: expert parallelism is the
dispatcher it is given (LocalDispatcher for EP = 1) and the subset of experts it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_pd.config.model import ModelConfig
from moe_pd.model.experts import DenseMLP, RoutedExperts
from moe_pd.model.gate import Gate
from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, expert_ids: Sequence[int], dispatcher: Dispatcher) -> None:
        super().__init__()
        if dispatcher.num_local_experts != len(expert_ids):
            raise ValueError(
                f"dispatcher expects {dispatcher.num_local_experts} local experts, layer holds {len(expert_ids)}"
            )
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(expert_ids, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0
            else None
        )
        self.dispatcher = dispatcher
        self.layer_idx = layer_idx

    # The computation in the pieces the overlap schedule interleaves, in order (DecoderLayer.stages runs them,
    # with a profiler range around each): gate, dispatch_start, shared, dispatch_wait, routed, combine_start,
    # combine_wait, output.
    def dispatch_start(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor):
        return self.dispatcher.dispatch_start(x_TD, topk_ids_TK, topk_weights_TK, self.layer_idx)

    def shared(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        return self.shared_experts(x_TD) if self.shared_experts is not None else None

    def dispatch_wait(self, pending) -> DispatchResult:
        return self.dispatcher.dispatch_wait(pending)

    def routed(self, routed: DispatchResult) -> torch.Tensor:
        """This rank's experts over the rows it received (grouped by local expert)."""
        return self.experts(routed.x_ND, routed.counts_E)

    def combine_start(self, y_ND: torch.Tensor, routed: DispatchResult):
        return self.dispatcher.combine_start(y_ND, routed.handle)

    def combine_wait(self, pending) -> torch.Tensor:
        return self.dispatcher.combine_wait(pending)

    @staticmethod
    def output(routed_TD: torch.Tensor, shared_TD: torch.Tensor | None) -> torch.Tensor:
        return routed_TD if shared_TD is None else routed_TD + shared_TD
