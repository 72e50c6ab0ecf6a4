"""Feed-forward blocks: the dense SwiGLU MLP and the routed experts computed grouped by expert.

Legend: T tokens, D hidden, F expert inner width, E local expert slots, N rows grouped by expert.
Routed expert weights are stacked per local slot (gate and up fused, gate first, as transformers keeps
them); `expert_ids[slot]` is the global expert id, which is what checkpoints and traces use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); also the shared experts (width n_shared * F)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_swiglu(x_ND: torch.Tensor, counts_E: Sequence[int], w13_EFD: torch.Tensor,
                   w2_EDF: torch.Tensor) -> torch.Tensor:
    """Reference grouped expert MLP: rows [start, start + counts[e]) go through expert slot e."""
    out_ND = x_ND.new_empty(x_ND.shape[0], w2_EDF.shape[1])
    start = 0
    for e, count in enumerate(counts_E):
        if count == 0:
            continue
        rows = x_ND[start : start + count]
        gate, up = F.linear(rows, w13_EFD[e]).chunk(2, dim=-1)
        out_ND[start : start + count] = F.linear(F.silu(gate) * up, w2_EDF[e])
        start += count
    return out_ND


class RoutedExperts(nn.Module):
    """The routed experts this rank holds, by global id."""

    def __init__(self, expert_ids: Sequence[int], hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        num = len(self.expert_ids)
        self.gate_up_proj = nn.Parameter(torch.empty(num, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num, hidden_size, intermediate_size))

    ops = None
    """moe_pd.model.ops implementation (set by DeepseekForCausalLM.use_ops); None: grouped_swiglu."""

    @property
    def num_local_experts(self) -> int:
        return len(self.expert_ids)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows grouped by slot ([N, D], counts_E each), or the masked layout ([E, capacity, D], counts_E
        valid rows per slot) from MaskedLocalDispatcher."""
        if x_ND.dim() == 3:
            if self.ops is None:
                raise RuntimeError("the masked layout needs moe_pd.model.ops (DeepseekForCausalLM.use_ops)")
            return self.ops.experts_masked(x_ND, counts_E, self.gate_up_proj, self.down_proj)
        if self.ops is not None:
            return self.ops.experts(x_ND, counts_E, self.gate_up_proj, self.down_proj)
        return grouped_swiglu(x_ND, counts_E.tolist(), self.gate_up_proj, self.down_proj)
