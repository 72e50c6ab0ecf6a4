"""Feed-forward blocks: the dense SwiGLU MLP and the routed experts computed grouped by expert.

Legend: T tokens, D hidden, F expert inner width, E local expert slots, N rows grouped by expert.
Routed expert weights are stacked per local slot (gate and up fused, gate first, as transformers keeps
them); `expert_ids[slot]` is the global expert id, which is what checkpoints and traces use. With
`quantize_fp8()` they are kept in FP8 e4m3 with one scale per 128x128 block (DeepSeek-V3's format) and
activations are quantised per token and 128 channels on the way in, as the FP8 grouped GEMM takes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_pd.fp8 import (
    FP8_DTYPE,
    dequantize_act_1x128,
    dequantize_block_fp8,
    quantize_act_1x128,
    quantize_block_fp8,
)


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); also the shared experts (width n_shared * F)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _per_expert(x_ND: torch.Tensor, counts_E: Sequence[int], out_dim: int,
                mlp: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Rows [start, start + counts[e]) through mlp(rows, e), for every slot e with rows."""
    out_ND = x_ND.new_empty(x_ND.shape[0], out_dim)
    start = 0
    for e, count in enumerate(counts_E):
        if count:
            out_ND[start : start + count] = mlp(x_ND[start : start + count], e)
            start += count
    return out_ND


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch's grouped GEMM (what transformers' experts use): CPU any float dtype, CUDA bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def _grouped_linear(x_ND: torch.Tensor, offsets_E: torch.Tensor, w_EOI: torch.Tensor) -> torch.Tensor:
    """Row n times w[e]^T for the slot e whose [offsets[e-1], offsets[e]) holds n: one call for all slots."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(x_ND, w_EOI.transpose(1, 2), offs=offsets_E)


def grouped_swiglu(x_ND: torch.Tensor, counts_E: torch.Tensor | Sequence[int], w13_EFD: torch.Tensor,
                   w2_EDF: torch.Tensor) -> torch.Tensor:
    """Reference grouped expert MLP: rows [start, start + counts[e]) go through expert slot e. One grouped
    GEMM per projection where torch has one (bit-identical to a per-expert loop on CPU); a loop over the
    experts with rows when there are fewer rows than experts (a small decode step) or no grouped GEMM."""
    if grouped_mm_supported(x_ND) and w13_EFD.dtype == x_ND.dtype and x_ND.shape[0] >= w13_EFD.shape[0]:
        offsets_E = torch.cumsum(torch.as_tensor(counts_E, device=x_ND.device), 0, dtype=torch.int32)
        return _grouped_linear(_swiglu(_grouped_linear(x_ND, offsets_E, w13_EFD)), offsets_E, w2_EDF)
    counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else counts_E
    return _per_expert(x_ND, counts, w2_EDF.shape[1],
                       lambda rows, e: F.linear(_swiglu(F.linear(rows, w13_EFD[e])), w2_EDF[e]))


def grouped_swiglu_fp8(x_ND: torch.Tensor, counts_E: Sequence[int], w13_EFD: torch.Tensor, s13_EIJ: torch.Tensor,
                       w2_EDF: torch.Tensor, s2_EIJ: torch.Tensor) -> torch.Tensor:
    """Reference of the FP8 expert MLP: the activations quantised 1x128 before each GEMM (as the kernels
    take them), the block-scaled weights dequantised, fp32 math, the result in x's dtype."""
    def through_fp8(a: torch.Tensor) -> torch.Tensor:
        return dequantize_act_1x128(*quantize_act_1x128(a), torch.float32)

    def mlp(rows: torch.Tensor, e: int) -> torch.Tensor:
        h = _swiglu(F.linear(through_fp8(rows), dequantize_block_fp8(w13_EFD[e], s13_EIJ[e])))
        return F.linear(through_fp8(h.to(x_ND.dtype)), dequantize_block_fp8(w2_EDF[e], s2_EIJ[e])).to(x_ND.dtype)

    return _per_expert(x_ND, counts_E, w2_EDF.shape[1], mlp)


def swiglu_experts(x_ND: torch.Tensor, counts_E: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                   scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rows grouped by expert slot through the torch reference; `scales`: FP8 weights' block scales."""
    if scales is not None:
        return grouped_swiglu_fp8(x_ND, counts_E.tolist(), w13_EFD, scales[0], w2_EDF, scales[1])
    return grouped_swiglu(x_ND, counts_E, w13_EFD, w2_EDF)


def masked_swiglu(x_ECD: torch.Tensor, masked_m_E: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                  scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The masked layout [E, capacity, D] with masked_m_E valid rows per expert (rows past it: 0)."""
    out = x_ECD.new_zeros(*x_ECD.shape[:2], w2_EDF.shape[1])
    for e, rows in enumerate(masked_m_E.tolist()):
        one = (scales[0][e : e + 1], scales[1][e : e + 1]) if scales is not None else None
        out[e, :rows] = swiglu_experts(x_ECD[e, :rows], torch.tensor([rows]), w13_EFD[e : e + 1],
                                       w2_EDF[e : e + 1], one)
    return out


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
    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """FP8 weights: (gate_up [E, 2F/128, D/128], down [E, D/128, F/128]) block scales; None: unquantised."""
        if "gate_up_scale" not in self._buffers:
            return None
        return self.gate_up_scale, self.down_scale

    def quantize_fp8(self) -> None:
        """Keeps the weights in FP8 e4m3 with 128x128 block scales (needs D and F in multiples of 128)."""
        dense = (self.gate_up_proj.detach(), self.down_proj.detach())
        self.allocate_fp8()
        for w_EXY, weight, scale in zip(dense, (self.gate_up_proj, self.down_proj), (self.gate_up_scale,
                                                                                     self.down_scale)):
            for slot, w in enumerate(w_EXY):
                weight.data[slot], scale[slot] = quantize_block_fp8(w)

    def allocate_fp8(self) -> None:
        """Replaces the weights with empty FP8 ones and their block scales (the loader then fills both, from
        an FP8 checkpoint bit for bit)."""
        e, two_f, d = self.gate_up_proj.shape
        if d % 128 or two_f % 256:
            raise ValueError(f"FP8 experts need hidden and expert widths in multiples of 128, got {d}, {two_f // 2}")
        device = self.gate_up_proj.device
        self.gate_up_proj = nn.Parameter(torch.empty(e, two_f, d, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, d, two_f // 2, dtype=FP8_DTYPE, device=device),
                                      requires_grad=False)
        self.register_buffer("gate_up_scale", torch.empty(e, two_f // 128, d // 128, device=device))
        self.register_buffer("down_scale", torch.empty(e, d // 128, two_f // 256, device=device))

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by local slot (weights, then FP8 block scales when kept): what moves with an
        expert when EPLB changes the placement."""
        return [self.gate_up_proj, self.down_proj, *(self.scales or ())]

    @property
    def num_local_experts(self) -> int:
        return len(self.expert_ids)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows grouped by slot ([N, D], counts_E each), or the masked layout ([E, capacity, D], counts_E
        valid rows per slot) from MaskedLocalDispatcher."""
        if x_ND.dim() == 3:
            masked = self.ops.experts_masked if self.ops is not None else masked_swiglu
            return masked(x_ND, counts_E, self.gate_up_proj, self.down_proj, self.scales)
        if self.ops is not None:
            return self.ops.experts(x_ND, counts_E, self.gate_up_proj, self.down_proj, self.scales)
        return swiglu_experts(x_ND, counts_E, self.gate_up_proj, self.down_proj, self.scales)
