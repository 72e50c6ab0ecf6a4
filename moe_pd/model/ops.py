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
from moe_pd.model.experts import grouped_swiglu
from moe_pd.model.gate import route


class TorchOps:
    """Torch references: every device, every shape."""

    name = "torch"
    has_mla_decode = False
    """The torch path attends with MLA._absorbed over gathered latents; no paged decode kernel."""

    def gate(self, logits_TE: torch.Tensor, bias_E: torch.Tensor | None,
             cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits_TE, bias_E, cfg)

    def experts(self, x_ND: torch.Tensor, counts_E: torch.Tensor, w13_EFD: torch.Tensor,
                w2_EDF: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_ND, counts_E.tolist(), w13_EFD, w2_EDF)

    def experts_masked(self, x_ECD: torch.Tensor, masked_m_E: torch.Tensor, w13_EFD: torch.Tensor,
                       w2_EDF: torch.Tensor) -> torch.Tensor:
        """The masked layout [E, capacity, D] with masked_m_E valid rows per expert (rows past it: 0)."""
        out = x_ECD.new_zeros(*x_ECD.shape[:2], w2_EDF.shape[1])
        for e, rows in enumerate(masked_m_E.tolist()):
            out[e, :rows] = grouped_swiglu(x_ECD[e, :rows], [rows], w13_EFD[e : e + 1], w2_EDF[e : e + 1])
        return out


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

    def experts(self, x_ND, counts_E, w13_EFD, w2_EDF):
        """Rows arrive grouped by local expert (counts_E); they go to the 128-aligned contiguous layout,
        through the two grouped GEMMs, and back."""
        if x_ND.shape[0] == 0:
            return x_ND.new_empty(0, w2_EDF.shape[1])
        dest_N1, m_indices_M = self.k.contiguous_layout_from_counts(counts_E)
        x_MD = self.k.permute(x_ND, dest_N1, m_indices_M.numel())
        h_MF = self.k.grouped_gemm(x_MD, w13_EFD, m_indices=m_indices_M, swiglu=True)
        y_MD = self.k.grouped_gemm(h_MF, w2_EDF, m_indices=m_indices_M)
        return self.k.unpermute(y_MD, dest_N1)

    def experts_masked(self, x_ECD, masked_m_E, w13_EFD, w2_EDF):
        h_ECF = self.k.grouped_gemm(x_ECD, w13_EFD, masked_m=masked_m_E, swiglu=True)
        return self.k.grouped_gemm(h_ECF, w2_EDF, masked_m=masked_m_E)

    def mla_decode(self, q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale):
        return self.k.mla_decode(q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale)


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
