"""Token order <-> expert order, in DeepGEMM's two layouts (github.com/deepseek-ai/DeepGEMM).

- contiguous (prefill): every expert's rows back to back, each segment padded to a multiple of 128;
  `m_indices[row]` is the row's expert, -1 on padding rows. Its length needs the counts on the host.
- masked (decode, CUDA-graph friendly): `[E, capacity, D]` with `masked_m[e]` valid rows per expert;
  no host synchronisation (a row beyond capacity is dropped: size capacity >= tokens and none is).

    dest_TK, m_indices_M = contiguous_layout(topk_ids_TK, num_experts)
    x_MD = permute(x_TD, dest_TK, m_indices_M.numel())          # row t goes to dest[t, k] for each k
    y_TD = unpermute(y_MD, dest_TK, weights_TK)                 # sum_k weights[t, k] * y[dest[t, k]]

The layouts are computed with torch ops (a stable sort by expert keeps each expert's rows in token
order); the kernels move the rows. References: permute_reference, unpermute_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_pd.kernels._common import check, check_tensor

ALIGN = 128
"""DeepGEMM's M alignment of the contiguous layout."""


def _ranks(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert of each flattened (t, k), rank of that pair among its expert's pairs, counts per expert)."""
    flat = topk_ids_TK.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # not bincount: it syncs with the host to size its output
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return flat, ranks, counts


def _contiguous(expert_R: torch.Tensor, rank_R: torch.Tensor, counts_E: torch.Tensor,
                align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (their expert, their rank within it) -> (dest row, m_indices) of the contiguous layout."""
    padded = (counts_E + align - 1) // align * align
    dest = (torch.cumsum(padded, 0) - padded)[expert_R] + rank_R
    m_indices = torch.full((int(padded.sum()),), -1, dtype=torch.int32, device=counts_E.device)
    m_indices[dest] = expert_R.to(torch.int32)
    return dest, m_indices


def contiguous_layout(topk_ids_TK: torch.Tensor, num_experts: int, align: int = ALIGN) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(dest row [T, K] int64, m_indices [M] int32 with -1 on padding rows)."""
    flat, ranks, counts = _ranks(topk_ids_TK, num_experts)
    dest, m_indices = _contiguous(flat, ranks, counts, align)
    return dest.view(topk_ids_TK.shape), m_indices


def contiguous_layout_from_counts(counts_E: torch.Tensor, align: int = ALIGN) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows already grouped by expert (counts_E rows each, in order): (dest row [N, 1], m_indices [M])."""
    counts = counts_E.to(torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    expert_N = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    rank_N = torch.arange(expert_N.numel(), device=counts.device) - starts[expert_N]
    dest, m_indices = _contiguous(expert_N, rank_N, counts, align)
    return dest[:, None], m_indices


def masked_layout(topk_ids_TK: torch.Tensor, num_experts: int, capacity: int,
                  valid_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dest row [T, K] int64 into [E * capacity] rows, -1 when beyond capacity or for a token that
    `valid_T` marks as padding; masked_m [E] int32). No host synchronisation (CUDA-graph safe)."""
    ids = topk_ids_TK
    if valid_T is not None:  # padding tokens go to an extra group that is then dropped
        ids = torch.where(valid_T[:, None], ids, num_experts)
    flat, ranks, counts = _ranks(ids, num_experts + 1)
    keep = (ranks < capacity) & (flat < num_experts)
    dest = torch.where(keep, flat * capacity + ranks, -1)
    return dest.view(topk_ids_TK.shape), counts[:num_experts].clamp(max=capacity).to(torch.int32)


@triton.jit
def _permute_kernel(x_ptr, dest_ptr, out_ptr, stride_x, stride_out, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    pair = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dest = tl.load(dest_ptr + pair)
    if dest >= 0:
        row = tl.load(x_ptr + (pair // K) * stride_x + cols, mask=cols < D, other=0.0)
        tl.store(out_ptr + dest * stride_out + cols, row, mask=cols < D)


@triton.jit
def _unpermute_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, stride_y, stride_out, D, K: tl.constexpr,
                      BLOCK_D: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(K):
        dest = tl.load(dest_ptr + token * K + k)
        if dest >= 0:
            row = tl.load(y_ptr + dest * stride_y + cols, mask=cols < D, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                row = row * tl.load(w_ptr + token * K + k).to(tl.float32)
            acc += row
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def _block_d(dim: int) -> int:
    return min(1024, triton.next_power_of_2(dim))


def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_rows: int, zero_fill: bool = False) -> torch.Tensor:
    """[num_rows, D] with x[t] at every dest[t, k] >= 0. Other rows are left unwritten unless zero_fill
    (the GEMMs never read padding rows' results)."""
    check_tensor("x_TD", x_TD, 2)
    check_tensor("dest_TK", dest_TK, 2, (torch.int64, torch.int32))
    check(dest_TK.shape[0] == x_TD.shape[0], f"dest_TK has {dest_TK.shape[0]} rows, x_TD {x_TD.shape[0]}")
    x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
    dest_TK = dest_TK.contiguous()
    alloc = torch.zeros if zero_fill else torch.empty
    out = alloc(num_rows, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device)
    if dest_TK.numel():
        block = _block_d(x_TD.shape[1])
        _permute_kernel[(dest_TK.numel(), triton.cdiv(x_TD.shape[1], block))](
            x_TD, dest_TK, out, x_TD.stride(0), out.stride(0), x_TD.shape[1], dest_TK.shape[1], block)
    return out


def unpermute(y_MD: torch.Tensor, dest_TK: torch.Tensor, weights_TK: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[T, D]: sum over k of weights[t, k] * y[dest[t, k]] (fp32 accumulation; dest -1 contributes 0)."""
    check_tensor("y_MD", y_MD, 2)
    check_tensor("dest_TK", dest_TK, 2, (torch.int64, torch.int32))
    if weights_TK is not None:
        check(weights_TK.shape == dest_TK.shape, f"weights_TK {tuple(weights_TK.shape)} != dest_TK "
                                                 f"{tuple(dest_TK.shape)}")
        weights_TK = weights_TK.contiguous()
    y_MD = y_MD if y_MD.stride(1) == 1 else y_MD.contiguous()
    tokens, k = dest_TK.shape
    out = torch.empty(tokens, y_MD.shape[1], dtype=out_dtype or y_MD.dtype, device=y_MD.device)
    if tokens:
        block = _block_d(y_MD.shape[1])
        _unpermute_kernel[(tokens, triton.cdiv(y_MD.shape[1], block))](
            y_MD, dest_TK.contiguous(), weights_TK if weights_TK is not None else y_MD, out, y_MD.stride(0),
            out.stride(0), y_MD.shape[1], k, block, weights_TK is not None)
    return out


def permute_reference(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    out = x_TD.new_zeros(num_rows, x_TD.shape[1])
    keep = dest_TK >= 0
    rows = torch.arange(x_TD.shape[0], device=x_TD.device)[:, None].expand_as(dest_TK)
    out[dest_TK[keep]] = x_TD[rows[keep]]
    return out


def unpermute_reference(y_MD: torch.Tensor, dest_TK: torch.Tensor, weights_TK: torch.Tensor | None) -> torch.Tensor:
    rows = y_MD.float()[dest_TK.clamp(min=0)] * (dest_TK >= 0)[..., None]
    if weights_TK is not None:
        rows = rows * weights_TK.float()[..., None]
    return rows.sum(dim=1).to(y_MD.dtype)
