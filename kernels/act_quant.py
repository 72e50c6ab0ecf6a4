"""FP8 e4m3 activation quantisation, one scale per token per 128 channels (DeepSeek-V3's 1x128 scheme).

    q_TD, scales_TG = quantize_act(x_TD)     # G = D / 128; x ~= q * scales (per group)

Reference: moe_pd.fp8.quantize_act_1x128 (the same formula: scale = max(amax, 1e-12) / 448).
Triton's interpreter rounds fp32 -> e4m3 stores wrongly, so interpreted runs store the scaled fp32 values
and cast them with torch (DEVELOPERS.md); compiled runs store e4m3 directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_pd.kernels._common import check, check_tensor, interpreted

FP8_MAX = 448.0
GROUP = 128


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, D: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     FP8_MAX_: tl.constexpr):
    token = tl.program_id(0)
    group = tl.program_id(1)
    cols = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    x = tl.load(x_ptr + token * stride_x + cols).to(tl.float32)
    # div_rn: IEEE division, as torch divides (Triton's `/` on fp32 is div.full, about 2 ulp off)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), FP8_MAX_)
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX_, FP8_MAX_)
    tl.store(q_ptr + token * stride_q + cols, q.to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + token * (D // GROUP_SIZE) + group, scale)


def quantize_act(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 [T, D], fp32 scales [T, D/128]); D must be a multiple of 128."""
    check_tensor("x_TD", x_TD, 2, (torch.float32, torch.bfloat16, torch.float16))
    tokens, dim = x_TD.shape
    check(dim % GROUP == 0, f"x_TD: hidden size {dim} must be a multiple of {GROUP}")
    x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
    store_fp32 = interpreted()
    q = torch.empty(tokens, dim, dtype=torch.float32 if store_fp32 else torch.float8_e4m3fn, device=x_TD.device)
    scales = torch.empty(tokens, dim // GROUP, dtype=torch.float32, device=x_TD.device)
    if tokens:
        _quantize_kernel[(tokens, dim // GROUP)](x_TD, q, scales, x_TD.stride(0), q.stride(0), dim, GROUP, FP8_MAX)
    return (q.to(torch.float8_e4m3fn) if store_fp32 else q), scales
