"""Triton kernels, imported as moe_pd.kernels (see setup.py). The model calls them through
moe_pd.model.ops (on CUDA; torch references on CPU). Each module: a kernel, a thin wrapper that checks
shapes and computes the grid, and a torch reference. Tests: tests/unit/test_kernels.py (interpreter,
TRITON_INTERPRET=1) and tests/gpu/test_kernels_gpu.py; benchmarks: perf/bench_kernels.py."""

from moe_pd.kernels.act_quant import quantize_act
from moe_pd.kernels.gate import fused_gate
from moe_pd.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference
from moe_pd.kernels.mla_decode import default_splits, mla_decode, mla_decode_reference
from moe_pd.kernels.permute import (
    contiguous_layout,
    contiguous_layout_from_counts,
    masked_layout,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)

__all__ = [
    "contiguous_layout", "contiguous_layout_from_counts", "default_splits", "fused_gate", "grouped_gemm",
    "grouped_gemm_reference",
    "masked_layout", "mla_decode", "mla_decode_reference", "permute", "permute_reference", "quantize_act",
    "unpermute", "unpermute_reference",
]
