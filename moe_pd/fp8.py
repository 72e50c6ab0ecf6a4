"""FP8 e4m3 weights with one scale per 128x128 block, as DeepSeek-V3's checkpoints store them.

`weight_scale_inv[i, j]` multiplies block (i, j): dequantised = fp8 * scale_inv. Activations use
1x128 per-token scales (quantize_act_1x128), as the FP8 grouped GEMM takes them. These helpers sit below the
model, the kernels and the dispatchers (all three use them), so none of those imports another for them.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def _expand_blocks(scale_IJ: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    return scale_IJ.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize_block_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = w_fp8.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w_fp8.shape)} "
                         f"in {block[0]}x{block[1]} blocks (expected {want})")
    return (w_fp8.float() * _expand_blocks(scale_inv.float(), rows, cols, block)).to(dtype)


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale_inv per block) with each block's amax mapped to the fp8 maximum."""
    rows, cols = w.shape
    nb_r, nb_c = -(-rows // block[0]), -(-cols // block[1])
    padded = w.float().new_zeros(nb_r * block[0], nb_c * block[1])
    padded[:rows, :cols] = w.float()
    blocks = padded.view(nb_r, block[0], nb_c, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb_r * block[0], nb_c * block[1])[:rows, :cols].contiguous(), scale_inv


def quantize_act_1x128(x_TD: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel activation quantisation: (fp8 [T, D], fp32 scales [T, D/128])."""
    t, d = x_TD.shape
    if d % group:
        raise ValueError(f"hidden size {d} must be a multiple of {group}")
    g = x_TD.float().view(t, d // group, group)
    scale = g.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(t, d), scale


def dequantize_act_1x128(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_act_1x128 over any leading dims: (e4m3 [..., D], fp32 [..., D/128]) -> [..., D]."""
    shape = q.shape
    groups = scales.shape[-1]
    blocks = q.float().reshape(*shape[:-1], groups, shape[-1] // groups)
    return (blocks * scales.float()[..., None]).reshape(shape).to(dtype)
