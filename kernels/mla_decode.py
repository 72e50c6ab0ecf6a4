"""MLA decode attention in the absorbed form, straight from the paged latent cache.

    out_BHC = mla_decode(q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale)

q_latent is the no-rope query already multiplied by W_UK (B sequences, H heads, C = kv_lora_rank, 512 for
V3); q_pe the rope part (R = 64). The cache holds one row [latent C | k_pe R] per token: page p, slot s at
cache_PSW[p, s]. The latent is both key (with k_pe) and value, so each program streams a sequence's rows
once for BLOCK_H heads: scores = q_latent . latent + q_pe . k_pe, an online softmax, and out = p . latent.
W_UV and o_proj stay outside (moe_pd.model.mla). One program per (sequence, head block); no split over the
context. Reference: mla_decode_reference (the expanded einsums of MLA._absorbed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_pd.kernels._common import check, check_tensor, interpreted, is_pow2


def _configs():
    if interpreted():
        return [triton.Config({"BLOCK_H": 16, "BLOCK_N": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_H": h, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for h, n, w, s in [(16, 64, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 1)]]


@triton.autotune(configs=_configs(), key=["H", "C", "R", "PAGE"])
@triton.jit
def _mla_decode_kernel(q_ptr, qpe_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, scale, H,
                       stride_qb, stride_qh, stride_pb, stride_ph, stride_tb, stride_ob, stride_oh,
                       C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    cs = tl.arange(0, C)
    rs = tl.arange(0, R)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + cs[None, :], mask=head_ok[:, None], other=0.0)
    q_pe = tl.load(qpe_ptr + seq * stride_pb + heads[:, None] * stride_ph + rs[None, :], mask=head_ok[:, None],
                   other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    length = tl.load(lens_ptr + seq)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, C), dtype=tl.float32)
    for start in range(0, length, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < length
        page = tl.load(tables_ptr + seq * stride_tb + pos // PAGE, mask=pos_ok, other=0)
        row = (page.to(tl.int64) * PAGE + pos % PAGE) * (C + R)
        latent = tl.load(cache_ptr + row[:, None] + cs[None, :], mask=pos_ok[:, None], other=0.0)
        k_pe = tl.load(cache_ptr + row[:, None] + C + rs[None, :], mask=pos_ok[:, None], other=0.0)
        if UPCAST:
            latent = latent.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        if R < 16:  # tl.dot needs K >= 16 on GPUs: a narrow rope part (test models) by products and a sum
            rope = tl.sum(q_pe.to(tl.float32)[:, None, :] * k_pe.to(tl.float32)[None, :, :], axis=2)
        elif IEEE:
            rope = tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
        else:
            rope = tl.dot(q_pe, tl.trans(k_pe))
        if IEEE:  # fp32 caches: full fp32 products, not tf32
            scores = tl.dot(q, tl.trans(latent), input_precision="ieee") + rope
        else:
            scores = tl.dot(q, tl.trans(latent)) + rope
        scores = tl.where(pos_ok[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a padding slot (length 0) reads nothing, writes 0
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + cs[None, :], out.to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None])


def mla_decode(q_latent_BHC: torch.Tensor, q_pe_BHR: torch.Tensor, cache_PSW: torch.Tensor,
               block_tables_BM: torch.Tensor, seq_lens_B: torch.Tensor, softmax_scale: float,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, H, C] attention output in the latent space; a sequence with seq_lens 0 (a padding slot of a
    CUDA graph's batch) reads no row and gets zeros."""
    check_tensor("q_latent_BHC", q_latent_BHC, 3)
    check_tensor("q_pe_BHR", q_pe_BHR, 3)
    check_tensor("cache_PSW", cache_PSW, 3)
    batch, heads, c = q_latent_BHC.shape
    r = q_pe_BHR.shape[2]
    check(q_pe_BHR.shape[:2] == (batch, heads), f"q_pe_BHR {tuple(q_pe_BHR.shape)} vs q_latent {(batch, heads)}")
    check(cache_PSW.shape[2] == c + r, f"cache rows are {cache_PSW.shape[2]} wide, expected {c} + {r}")
    check(is_pow2(c) and is_pow2(r), f"latent ({c}) and rope ({r}) widths must be powers of two")
    page = cache_PSW.shape[1]
    check(block_tables_BM.shape[0] == batch and seq_lens_B.shape == (batch,), "block tables / seq lens per sequence")
    check(cache_PSW.is_contiguous(), "cache_PSW must be contiguous")
    q_latent_BHC = q_latent_BHC if q_latent_BHC.stride(2) == 1 else q_latent_BHC.contiguous()
    q_pe_BHR = q_pe_BHR if q_pe_BHR.stride(2) == 1 else q_pe_BHR.contiguous()
    block_tables_BM = block_tables_BM.contiguous()
    out = torch.empty(batch, heads, c, dtype=out_dtype or q_latent_BHC.dtype, device=q_latent_BHC.device)
    if batch:
        def grid(meta):
            return batch, triton.cdiv(heads, meta["BLOCK_H"])

        _mla_decode_kernel[grid](
            q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B.contiguous(), out, float(softmax_scale),
            heads, q_latent_BHC.stride(0), q_latent_BHC.stride(1), q_pe_BHR.stride(0), q_pe_BHR.stride(1),
            block_tables_BM.stride(0), out.stride(0), out.stride(1), c, r, page, interpreted(),
            cache_PSW.dtype == torch.float32)
    return out


def mla_decode_reference(q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale,
                         out_dtype=None):
    batch, _, c = q_latent_BHC.shape
    page = cache_PSW.shape[1]
    out = torch.empty(*q_latent_BHC.shape, dtype=out_dtype or q_latent_BHC.dtype, device=q_latent_BHC.device)
    rows = cache_PSW.reshape(-1, cache_PSW.shape[2]).float()
    for b in range(batch):
        length = int(seq_lens_B[b])
        pos = torch.arange(length, device=cache_PSW.device)
        kv = rows[block_tables_BM[b, pos // page] * page + pos % page]
        latent, k_pe = kv[:, :c], kv[:, c:]
        scores = (q_latent_BHC[b].float() @ latent.T + q_pe_BHR[b].float() @ k_pe.T) * softmax_scale
        out[b] = (scores.softmax(dim=-1) @ latent).to(out.dtype)
    return out
