"""The implementations of the model's hot operations, chosen once at start-up: torch references on CPU,
Triton kernels (moe_pd.kernels) on CUDA.

    model = build_model(cfg, device="cuda", ops=select_ops("auto", torch.device("cuda")))

`runtime.kernels` picks: auto (Triton on CUDA when triton imports, else torch), torch, or triton (on CPU
only under TRITON_INTERPRET=1: tests run the whole model through the kernels that way). The choice is
stored on the modules that call it (Gate, RoutedExperts, MLA) by `DeepseekForCausalLM.use_ops`.
"""

from __future__ import annotations

import os

import torch

from moe_pd.config.errors import ConfigError
from moe_pd.config.model import ModelConfig
from moe_pd.model.experts import masked_swiglu, swiglu_experts
from moe_pd.model.gate import route


class TorchOps:
    """Torch references: every device, every shape."""

    name = "torch"
    has_mla_decode = False
    """The torch path attends with MLA._absorbed over gathered latents; no paged decode kernel."""

    def gate(self, logits_TE: torch.Tensor, bias_E: torch.Tensor | None,
             cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits_TE, bias_E, cfg)

    def experts(self, x_ND: torch.Tensor, counts_E: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Rows grouped by expert slot; `scales`: the FP8 weights' block scales (RoutedExperts.scales)."""
        return swiglu_experts(x_ND, counts_E, w13_EFD, w2_EDF, scales)

    def experts_masked(self, x_ECD: torch.Tensor, masked_m_E: torch.Tensor, w13_EFD: torch.Tensor,
                       w2_EDF: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The masked layout [E, capacity, D] with masked_m_E valid rows per expert (rows past it: 0)."""
        return masked_swiglu(x_ECD, masked_m_E, w13_EFD, w2_EDF, scales)


class TritonOps(TorchOps):
    """moe_pd.kernels: the fused gate, the contiguous-layout grouped GEMMs with SwiGLU fused, MLA decode."""

    name = "triton"
    has_mla_decode = True

    def __init__(self) -> None:
        from moe_pd import kernels

        self.k = kernels

    def gate(self, logits_TE, bias_E, cfg):
        experts = cfg.n_routed_experts
        if experts & (experts - 1) or (cfg.topk_method != "greedy" and cfg.n_group & (cfg.n_group - 1)):
            return super().gate(logits_TE, bias_E, cfg)  # the fused kernel needs power-of-two shapes
        return self.k.fused_gate(logits_TE, bias_E, cfg.num_experts_per_tok, cfg.scoring_func, cfg.topk_method,
                                 cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def experts(self, x_ND, counts_E, w13_EFD, w2_EDF, scales=None):
        """Rows arrive grouped by local expert (counts_E); they go to the 128-aligned contiguous layout,
        through the two grouped GEMMs (FP8 when the weights are), and back."""
        if x_ND.shape[0] == 0:
            return x_ND.new_empty(0, w2_EDF.shape[1])
        dest_N1, m_indices_M = self.k.contiguous_layout_from_counts(counts_E)
        # FP8: padding rows zeroed, so quantising the whole layout sees no stale memory
        x_MD = self.k.permute(x_ND, dest_N1, m_indices_M.numel(), zero_fill=scales is not None)
        y_MD = self._mlp(x_MD, w13_EFD, w2_EDF, scales, x_ND.dtype, m_indices=m_indices_M)
        return self.k.unpermute(y_MD, dest_N1)

    def experts_masked(self, x_ECD, masked_m_E, w13_EFD, w2_EDF, scales=None):
        return self._mlp(x_ECD, w13_EFD, w2_EDF, scales, x_ECD.dtype, masked_m=masked_m_E)

    def _mlp(self, x, w13, w2, scales, dtype, **layout):
        """SwiGLU grouped GEMM then the down grouped GEMM; with FP8 weights each input is quantised 1x128."""
        if scales is None:
            return self.k.grouped_gemm(self.k.grouped_gemm(x, w13, swiglu=True, **layout), w2, **layout)
        q, s = self._quantize(x)
        h = self.k.grouped_gemm(q, w13, swiglu=True, a_scale=s, b_scale=scales[0], out_dtype=dtype, **layout)
        q, s = self._quantize(h)
        return self.k.grouped_gemm(q, w2, a_scale=s, b_scale=scales[1], out_dtype=dtype, **layout)

    def _quantize(self, x):
        q, s = self.k.quantize_act(x.reshape(-1, x.shape[-1]))
        return q.view(x.shape), s.view(*x.shape[:-1], -1)

    def mla_decode(self, q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale, queries=1):
        return self.k.mla_decode(q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale,
                                 queries=queries)


TORCH_OPS = TorchOps()


def select_ops(choice: str, device: torch.device) -> TorchOps:
    """auto: Triton on CUDA (when triton imports), else torch. triton on CPU needs TRITON_INTERPRET=1."""
    if choice == "torch":
        return TORCH_OPS
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("runtime.kernels=triton on CPU runs Triton's interpreter: set TRITON_INTERPRET=1 "
                          "(tests only; it is slow)")
    if choice == "auto" and device.type != "cuda":
        return TORCH_OPS
    try:
        return TritonOps()
    except ImportError as exc:
        if choice == "triton":
            raise ConfigError(f"runtime.kernels=triton: triton does not import ({exc}); pip install triton") from None
        return TORCH_OPS
