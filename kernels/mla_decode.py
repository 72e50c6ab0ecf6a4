"""MLA decode attention in the absorbed form, straight from the paged latent cache.

    out_BHC = mla_decode(q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale)
    out_BXC = mla_decode(q_latent_BXC, q_pe_BXR, ..., queries=Q)   # X = Q * H: Q new tokens per sequence

q_latent is the no-rope query already multiplied by W_UK (B sequences, H heads, C = kv_lora_rank, 512 for
V3); q_pe the rope part (R = 64). The cache holds one row [latent C | k_pe R] per token: page p, slot s at
cache_PSW[p, s]. The latent is both key (with k_pe) and value, so each program streams a sequence's rows
once for BLOCK_H heads: scores = q_latent . latent + q_pe . k_pe, an online softmax, and out = p . latent.
W_UV and o_proj stay outside (moe_pd.model.mla). Reference: mla_decode_reference (the expanded einsums of
MLA._absorbed).

Speculative verification attends Q > 1 new tokens per sequence (the last token and its drafts). As FlashMLA
does, the Q queries of a sequence are packed into the head axis (row x = query * H + head), so one program
streams a sequence's latent rows once for all of them; query q (the q-th of the last Q tokens) sees the
keys at positions below seq_len - (Q - 1 - q), the causal mask. A row whose visible keys all fall outside
a split ends that split with a max of -1e30 (the masking floor), which the merge weighs 0.

One program per (head block, sequence, context split). The head blocks of a sequence are neighbours in the
grid, so the latent rows one of them reads are still in L2 for the others. With `num_splits` > 1 each
sequence's context is cut into that many chunks (flash-decoding): each program writes its unnormalised
output with its running max and sum, and mla_decode merges the chunks. That keeps the SMs busy when
batch x head blocks is small; the split count depends only on the shapes, never on the lengths, so a CUDA
graph captures it.
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
            for h, n, w, s in TILES]


TILES = [(16, 32, 8, 2), (16, 16, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2)]
"""(BLOCK_H, BLOCK_N, warps, stages): each holds a [BLOCK_H, 512] fp32 accumulator, the query and a
[BLOCK_N, 576] cache tile without spilling a register on sm_90a or sm_100a (`python -m moe_pd.kernels.aot`);
wider head blocks (64) spill at every BLOCK_N tried, 4 warps at some of these, and (32, 16) with triton 3.6."""


@triton.autotune(configs=_configs(), key=["H", "C", "R", "PAGE", "SPLITS", "QUERIES"])
@triton.jit
def _mla_decode_kernel(q_ptr, qpe_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, ml_ptr, scale, H, SPLITS,
                       HEADS, stride_qb, stride_qh, stride_pb, stride_ph, stride_tb, stride_ob, stride_oh,
                       C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       PARTIAL: tl.constexpr, QUERIES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    # H rows per sequence: QUERIES x HEADS (query, head) pairs, query-major
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    seq = tl.program_id(1)
    split = tl.program_id(2)
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
    visible = length - (QUERIES - 1 - heads // HEADS)  # causal: keys each row's query may see
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N  # whole BLOCK_N tiles per split
    begin = split * chunk
    end = tl.minimum(length, begin + chunk)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, C), dtype=tl.float32)
    for start in range(begin, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
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
        if QUERIES > 1:
            # causal rows mask with a finite floor: a row that sees no key of a split's tiles gets a floor max
            # there, which the merge weighs 0 (a row's first tile always holds a key it sees when unsplit)
            seen = (tl.minimum(visible, end) - start).to(tl.int32)  # keys of this tile each row sees
            scores = tl.where(tl.arange(0, BLOCK_N)[None, :] < seen[:, None], scores * scale, -1.0e30)
        else:
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
    if PARTIAL:  # [B, S, H, C] unnormalised, and [B, S, 2, H] (running max, sum) for the merge
        base = (seq * SPLITS + split).to(tl.int64)
        tl.store(out_ptr + (base * H + heads[:, None]) * C + cs[None, :], acc, mask=head_ok[:, None])
        tl.store(ml_ptr + base * 2 * H + heads, m_i, mask=head_ok)
        tl.store(ml_ptr + base * 2 * H + H + heads, l_i, mask=head_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a padding slot (length 0) reads nothing, writes 0
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + cs[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def merge_splits(acc_BSHC: torch.Tensor, ml_BS2H: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Flash-decoding's merge: each split's output weighted by exp(its max - the overall max), over the summed
    weights. Splits that read no row (max -inf) weigh 0; a sequence with none gets zeros."""
    m_BSH, l_BSH = ml_BS2H.unbind(2)
    m_max_B1H = m_BSH.amax(dim=1, keepdim=True)
    m_max_B1H = torch.where(torch.isfinite(m_max_B1H), m_max_B1H, torch.zeros_like(m_max_B1H))
    w_BSH = torch.exp(m_BSH - m_max_B1H)
    total_BH = (w_BSH * l_BSH).sum(dim=1)
    out_BHC = (w_BSH[..., None] * acc_BSHC).sum(dim=1) / torch.where(total_BH > 0, total_BH, 1.0)[..., None]
    return out_BHC.to(out_dtype)


def default_splits(batch: int, heads: int, device: torch.device) -> int:
    """Context splits that give the GPU about two programs per SM (head blocks of 16 assumed), at most 16;
    1 when the batch alone fills it, and on CPU."""
    if device.type != "cuda":
        return 1
    programs = batch * triton.cdiv(heads, 16)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, triton.cdiv(2 * sms, max(programs, 1)))) if programs < sms else 1


def mla_decode(q_latent_BHC: torch.Tensor, q_pe_BHR: torch.Tensor, cache_PSW: torch.Tensor,
               block_tables_BM: torch.Tensor, seq_lens_B: torch.Tensor, softmax_scale: float,
               out_dtype: torch.dtype | None = None, num_splits: int | None = None, queries: int = 1) -> torch.Tensor:
    """[B, H, C] attention output in the latent space; a sequence with seq_lens 0 (a padding slot of a
    CUDA graph's batch) reads no row and gets zeros. `num_splits` cuts each context into that many chunks
    (None: default_splits, from the shapes only). `queries` > 1: the second axis holds `queries` x heads
    rows (query-major), the last `queries` tokens of each sequence, each attending causally."""
    check_tensor("q_latent_BHC", q_latent_BHC, 3)
    check_tensor("q_pe_BHR", q_pe_BHR, 3)
    check_tensor("cache_PSW", cache_PSW, 3)
    batch, heads, c = q_latent_BHC.shape
    r = q_pe_BHR.shape[2]
    check(q_pe_BHR.shape[:2] == (batch, heads), f"q_pe_BHR {tuple(q_pe_BHR.shape)} vs q_latent {(batch, heads)}")
    check(cache_PSW.shape[2] == c + r, f"cache rows are {cache_PSW.shape[2]} wide, expected {c} + {r}")
    check(is_pow2(c) and is_pow2(r), f"latent ({c}) and rope ({r}) widths must be powers of two")
    check(queries >= 1 and heads % queries == 0, f"{heads} rows are not {queries} queries x heads")
    page = cache_PSW.shape[1]
    check(block_tables_BM.shape[0] == batch and seq_lens_B.shape == (batch,), "block tables / seq lens per sequence")
    check(cache_PSW.is_contiguous(), "cache_PSW must be contiguous")
    q_latent_BHC = q_latent_BHC if q_latent_BHC.stride(2) == 1 else q_latent_BHC.contiguous()
    q_pe_BHR = q_pe_BHR if q_pe_BHR.stride(2) == 1 else q_pe_BHR.contiguous()
    block_tables_BM = block_tables_BM.contiguous()
    splits = default_splits(batch, heads, q_latent_BHC.device) if num_splits is None else num_splits
    check(splits >= 1, f"num_splits must be >= 1, got {splits}")
    out_dtype = out_dtype or q_latent_BHC.dtype
    device = q_latent_BHC.device
    if batch == 0:
        return torch.empty(0, heads, c, dtype=out_dtype, device=device)
    if splits == 1:
        out = torch.empty(batch, heads, c, dtype=out_dtype, device=device)
        ml = out  # unused
    else:
        out = torch.empty(batch, splits, heads, c, dtype=torch.float32, device=device)
        ml = torch.empty(batch, splits, 2, heads, dtype=torch.float32, device=device)

    def grid(meta):
        return triton.cdiv(heads, meta["BLOCK_H"]), batch, splits

    _mla_decode_kernel[grid](
        q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B.contiguous(), out, ml, float(softmax_scale),
        heads, splits, heads // queries, q_latent_BHC.stride(0), q_latent_BHC.stride(1), q_pe_BHR.stride(0),
        q_pe_BHR.stride(1), block_tables_BM.stride(0), out.stride(0), out.stride(1), c, r, page, interpreted(),
        cache_PSW.dtype == torch.float32, splits > 1, queries)
    return out if splits == 1 else merge_splits(out, ml, out_dtype)


def mla_decode_reference(q_latent_BHC, q_pe_BHR, cache_PSW, block_tables_BM, seq_lens_B, softmax_scale,
                         out_dtype=None, queries: int = 1):
    batch, rows, c = q_latent_BHC.shape
    page = cache_PSW.shape[1]
    out = torch.empty(*q_latent_BHC.shape, dtype=out_dtype or q_latent_BHC.dtype, device=q_latent_BHC.device)
    cache = cache_PSW.reshape(-1, cache_PSW.shape[2]).float()
    key_pos = torch.arange(int(seq_lens_B.max()) if batch else 0, device=cache_PSW.device)
    query_of_row = torch.arange(rows, device=cache_PSW.device) // (rows // queries)
    for b in range(batch):
        length = int(seq_lens_B[b])
        pos = key_pos[:length]
        kv = cache[block_tables_BM[b, pos // page] * page + pos % page]
        latent, k_pe = kv[:, :c], kv[:, c:]
        scores = (q_latent_BHC[b].float() @ latent.T + q_pe_BHR[b].float() @ k_pe.T) * softmax_scale
        visible = pos[None, :] < (length - (queries - 1 - query_of_row))[:, None]
        out[b] = (scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ latent).to(out.dtype)
    return out
