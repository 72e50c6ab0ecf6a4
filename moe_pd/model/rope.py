"""Decoupled rotary embedding of MLA with optional YaRN scaling.

Legend: T tokens, H heads, R rotary width (qk_rope_head_dim).
The frequencies, attention factor and softmax-scale correction follow transformers'
`_compute_yarn_parameters` and DeepSeek's `precompute_freqs_cis` (they agree on DeepSeek's configs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_pd.config.model import ModelConfig, RopeScalingConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, y: RopeScalingConfig, max_pos: int) -> torch.Tensor:
    orig = y.original_max_position_embeddings or max_pos

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (y.factor * pos_freqs)
    return inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float, float]:
    """Returns (inv_freq [R/2], cos/sin attention factor, softmax scale of q.k)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    scale = cfg.qk_head_dim**-0.5
    y = cfg.rope_scaling
    if y is None:
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0, scale
    inv_freq = _yarn_inv_freq(dim, base, y, cfg.max_position_embeddings)
    if y.attention_factor is not None:
        attention_factor = y.attention_factor
    elif y.mscale and y.mscale_all_dim:
        attention_factor = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(y.factor)
    if y.mscale_all_dim:
        scale = scale * yarn_mscale(y.factor, y.mscale_all_dim) ** 2
    return inv_freq, attention_factor, scale


class RotaryEmbedding(nn.Module):
    """cos/sin of each position, computed on the fly from inv_freq (no table to outgrow)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_factor, self.softmax_scale = rope_parameters(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recomputes inv_freq in place (after the model was built on the meta device)."""
        self.inv_freq = rope_parameters(self.cfg)[0].to(self.inv_freq.device)

    def forward(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_T[:, None].float() * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x_THR: torch.Tensor, cos_TR2: torch.Tensor, sin_TR2: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotates x [T, H, R] by per-token angles; interleaved pairs (x0,x1),(x2,x3) or halves."""
    cos = cos_TR2[:, None, :].to(x_THR.dtype)
    sin = sin_TR2[:, None, :].to(x_THR.dtype)
    if interleave:
        x1, x2 = x_THR[..., 0::2], x_THR[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x_THR.shape[-1] // 2
    x1, x2 = x_THR[..., :half], x_THR[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
