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
from moe_pd.parallel.dispatch.base import Dispatcher


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

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        topk_ids_TK, topk_weights_TK = self.gate(x_TD)
        routed = self.dispatcher.dispatch(x_TD, topk_ids_TK, topk_weights_TK, self.layer_idx)
        y_ND = self.experts(routed.x_ND, routed.counts_E)
        out_TD = self.dispatcher.combine(y_ND, routed.handle)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD
