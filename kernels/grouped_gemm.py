"""Grouped GEMM for the routed experts, bf16 or FP8 e4m3, in DeepGEMM's contiguous and masked layouts,
with SwiGLU optionally fused into the epilogue ("NT": out = a @ b[g]^T, b stored [G, N, K] as checkpoints
store expert weights).

    h_MF = grouped_gemm(x_MD, w13_GFD, m_indices=m_indices_M, swiglu=True)      # silu(x Wg^T) * (x Wu^T)
    y_MD = grouped_gemm(h_MF, w2_GDF, m_indices=m_indices_M)
    y_GCD = grouped_gemm(x_GCD, w2_GDF, masked_m=masked_m_G)                      # masked: [G, capacity, K]
    fp8: grouped_gemm(q_MK, w_GNK_fp8, ..., a_scale=s_MK128, b_scale=s_GN128K128)  # 1x128 and 128x128 scales

With `swiglu`, b holds 2N rows per group (gate rows first, then up, as transformers fuses them) and the
output has N columns: each program accumulates the gate and the up tile of the same columns and writes
silu(gate) * up once, in fp32 before the final rounding. In the contiguous layout a tile of BLOCK_M rows
never straddles two experts (segments are 128-aligned and BLOCK_M divides 128); padding rows (-1) are
read as zeros and not written. FP8 tiles use BLOCK_K = 128 so each K step has one activation scale per
row and one weight scale per tile. Under Triton's interpreter operands are upcast to fp32 before tl.dot
(its bf16/fp8 arithmetic is wrong); compiled runs feed tl.dot bf16 or fp8 directly.
Reference: grouped_gemm_reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moe_pd.kernels._common import check, check_tensor, interpreted
from moe_pd.kernels.permute import ALIGN

SCALE_BLOCK = 128
"""FP8 scale block: 1x128 activations, 128x128 weights."""
_SCALE = tl.constexpr(SCALE_BLOCK)
"""The same inside the kernel: a jitted function may read a module global only when it is a constexpr."""


TILES = {
    ("bf16", False): [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4)],
    ("bf16", True): [(128, 128, 64, 8, 3), (128, 64, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4)],
    ("fp8", False): [(128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4)],
    ("fp8", True): [(128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (64, 64, 128, 4, 4), (64, 64, 128, 4, 5)],
    ("fp32", False): [(32, 32, 32, 4, 2), (64, 64, 32, 4, 2), (64, 32, 32, 4, 3), (64, 64, 32, 8, 3)],
    ("fp32", True): [(32, 32, 32, 4, 2), (32, 64, 32, 4, 3)],
}
"""(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the autotuner may choose, per operand kind and SwiGLU. Each one
compiles for sm_90a and sm_100a within shared memory and with no register spilled
(`python -m moe_pd.kernels.aot`): SwiGLU keeps two accumulators and FP8 a partial product beside each, so
those take narrower tiles; fp32 operands (the tiny test model) multiply with FMAs, not tensor cores, and
take small ones. FP8 tiles have BLOCK_K = 128 and BLOCK_N dividing 128 (one scale per K step and tile);
BLOCK_M divides the contiguous layout's 128-row alignment."""


def _kind(fp8: bool, ieee: bool) -> str:
    return "fp8" if fp8 else "fp32" if ieee else "bf16"


def _config(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


def _configs():
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=1)]
    return [_config(*tile) for tile in dict.fromkeys(t for tiles in TILES.values() for t in tiles)]


def _prune(configs, named_args, **kwargs):
    """The tiles of this call's kind (TILES); under the interpreter one small config (BLOCK_K = 128 for FP8)."""
    flag = lambda name: bool(named_args.get(name, kwargs.get(name)))  # noqa: E731
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": SCALE_BLOCK}, num_warps=1)] if flag("FP8") \
            else configs
    wanted = TILES[(_kind(flag("FP8"), flag("IEEE")), flag("SWIGLU"))]
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)  # noqa: E731
    return [c for c in configs if key(c) in wanted]


@triton.autotune(configs=_configs(), key=["N", "K", "MASKED", "SWIGLU", "FP8"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, m_indices_ptr, masked_m_ptr,
                         M, N, K, CAPACITY, stride_am, stride_bg, stride_bn, stride_cm,
                         MASKED: tl.constexpr, SWIGLU: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr,
                         IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = tl.arange(0, BLOCK_M)
    if MASKED:
        tiles_per_group = tl.cdiv(CAPACITY, BLOCK_M)
        group = pid_m // tiles_per_group
        first = (pid_m % tiles_per_group) * BLOCK_M
        count = tl.load(masked_m_ptr + group)
        rows = group * CAPACITY + first + offs
        row_ok = (first + offs) < count
        live = first < count
    else:
        rows = pid_m * BLOCK_M + offs
        experts = tl.load(m_indices_ptr + rows, mask=rows < M, other=-1)
        row_ok = experts >= 0
        group = tl.max(experts, axis=0)  # a tile lies in one segment; -1 when all of it is padding
        live = group >= 0
    if live:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_am
        b_gate = b_ptr + group.to(tl.int64) * stride_bg + cols[None, :] * stride_bn
        b_up = b_gate + N * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_blocks = tl.cdiv(K, _SCALE)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            a = tl.load(a_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_gate + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:  # fp32 operands: full fp32 products, not tf32 (references and tests compare exactly)
                part = tl.dot(a, b, input_precision="ieee")
            else:
                part = tl.dot(a, b)
            if FP8:
                a_s = tl.load(a_scale_ptr + rows.to(tl.int64) * k_blocks + k0 // _SCALE, mask=row_ok, other=0.0)
                n_blocks = tl.cdiv(N * (2 if SWIGLU else 1), _SCALE)
                b_s = tl.load(b_scale_ptr + (group * n_blocks + (pid_n * BLOCK_N) // _SCALE) * k_blocks
                              + k0 // _SCALE)
                acc += part * a_s[:, None] * b_s
            else:
                acc += part
            if SWIGLU:
                b2 = tl.load(b_up + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    b2 = b2.to(tl.float32)
                if IEEE:
                    part_up = tl.dot(a, b2, input_precision="ieee")
                else:
                    part_up = tl.dot(a, b2)
                if FP8:
                    b2_s = tl.load(b_scale_ptr + (group * n_blocks + (N + pid_n * BLOCK_N) // _SCALE) * k_blocks
                                   + k0 // _SCALE)
                    acc_up += part_up * a_s[:, None] * b2_s
                else:
                    acc_up += part_up
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        out = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, *, m_indices: torch.Tensor | None = None,
                 masked_m: torch.Tensor | None = None, swiglu: bool = False, a_scale: torch.Tensor | None = None,
                 b_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous (`m_indices`, a [M, K] -> [M, N]) or masked (`masked_m`, a [G, C, K] -> [G, C, N]).
    b [G, N or 2N, K]. FP8 when a and b are e4m3 (then a_scale [rows, K/128], b_scale [G, N'/128, K/128]).
    The output is bf16 for FP8 inputs, else a's dtype, unless out_dtype says otherwise."""
    check((m_indices is None) != (masked_m is None), "give exactly one of m_indices (contiguous) and masked_m")
    check_tensor("b", b, 3)
    groups, n_rows, k = b.shape
    n = n_rows // 2 if swiglu else n_rows
    check(not swiglu or n_rows % 2 == 0, f"swiglu needs b with an even row count, got {n_rows}")
    fp8 = a.dtype == torch.float8_e4m3fn
    check(fp8 == (b.dtype == torch.float8_e4m3fn), f"a is {a.dtype} but b is {b.dtype}: both fp8 or neither")
    masked = masked_m is not None
    if masked:
        check_tensor("a", a, 3)
        check(a.shape[0] == groups and a.shape[2] == k, f"a {tuple(a.shape)} does not fit b {tuple(b.shape)}")
        check(masked_m.shape == (groups,), f"masked_m: expected ({groups},), got {tuple(masked_m.shape)}")
        capacity, rows = a.shape[1], a.shape[0] * a.shape[1]
    else:
        check_tensor("a", a, 2)
        check(a.shape[1] == k, f"a {tuple(a.shape)} does not fit b {tuple(b.shape)}")
        check(m_indices.shape == (a.shape[0],) and m_indices.dtype == torch.int32,
              f"m_indices: expected int32 ({a.shape[0]},), got {m_indices.dtype} {tuple(m_indices.shape)}")
        check(a.shape[0] % ALIGN == 0, f"contiguous layout: {a.shape[0]} rows is not a multiple of {ALIGN}")
        capacity, rows = 0, a.shape[0]
    if fp8:
        check(k % SCALE_BLOCK == 0 and n_rows % SCALE_BLOCK == 0 and (not swiglu or n % SCALE_BLOCK == 0),
              f"FP8 needs N and K in multiples of {SCALE_BLOCK}, got N={n_rows}, K={k}")
        got = None if a_scale is None else tuple(a_scale.shape)
        check(got in ((rows, k // SCALE_BLOCK), (*a.shape[:-1], k // SCALE_BLOCK)),
              f"a_scale: expected [{rows}, {k // SCALE_BLOCK}], got {got}")
        check(b_scale is not None and b_scale.shape == (groups, n_rows // SCALE_BLOCK, k // SCALE_BLOCK),
              f"b_scale: expected [{groups}, {n_rows // SCALE_BLOCK}, {k // SCALE_BLOCK}]")
    a2 = a.reshape(rows, k)
    a2 = a2 if a2.stride(1) == 1 else a2.contiguous()
    b = b if b.stride(2) == 1 else b.contiguous()
    dtype = out_dtype or (torch.bfloat16 if fp8 else a.dtype)
    c = torch.empty(*a.shape[:-1], n, dtype=dtype, device=a.device)
    c2 = c.view(rows, n)
    dummy = a2
    if rows and n:
        def grid(meta):
            tiles_m = groups * triton.cdiv(capacity, meta["BLOCK_M"]) if masked else triton.cdiv(rows, meta["BLOCK_M"])
            return tiles_m, triton.cdiv(n, meta["BLOCK_N"])

        _grouped_gemm_kernel[grid](
            a2, b, c2, a_scale.contiguous() if fp8 else dummy, b_scale.contiguous() if fp8 else dummy,
            m_indices if not masked else dummy, masked_m if masked else dummy, rows, n, k, capacity,
            a2.stride(0), b.stride(0), b.stride(1), c2.stride(0), MASKED=masked, SWIGLU=swiglu, FP8=fp8,
            UPCAST=interpreted(), IEEE=a.dtype == torch.float32)
    return c


def grouped_gemm_reference(a: torch.Tensor, b: torch.Tensor, *, m_indices: torch.Tensor | None = None,
                           masked_m: torch.Tensor | None = None, swiglu: bool = False,
                           a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same contract in fp32 torch ops (rows outside the layout are 0)."""
    from moe_pd.fp8 import dequantize_act_1x128, dequantize_block_fp8

    fp8 = a.dtype == torch.float8_e4m3fn
    a32 = dequantize_act_1x128(a, a_scale, torch.float32) if fp8 else a.float()
    b32 = torch.stack([dequantize_block_fp8(b[g], b_scale[g]) for g in range(b.shape[0])]) if fp8 else b.float()
    n = b.shape[1] // 2 if swiglu else b.shape[1]
    out = a32.new_zeros(*a.shape[:-1], n)

    def apply(x, g):
        y = F.linear(x, b32[g])
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y

    if masked_m is not None:
        for g in range(b.shape[0]):
            rows = int(masked_m[g])
            out[g, :rows] = apply(a32[g, :rows], g)
    else:
        for g in range(b.shape[0]):
            rows = m_indices == g
            if rows.any():
                out[rows] = apply(a32[rows], g)
    return out.to(out_dtype or (torch.bfloat16 if fp8 else a.dtype))
