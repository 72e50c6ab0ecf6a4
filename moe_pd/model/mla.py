"""Multi-head Latent Attention over the paged latent cache.

Legend: T tokens, D hidden, H heads, B sequences, Q max new tokens per sequence, L max cached tokens,
C kv_lora_rank, R rope width, N qk_nope_head_dim, V v_head_dim.

Every step writes this step's latent and rope key into the cache, then attends over the cache.
Two equivalent forms:
- expanded (prefill): kv_b_proj rebuilds per-head keys and values from every cached latent;
- absorbed (decode): kv_b_proj is folded into the query (W_UK) and the output (W_UV), so attention runs
  directly on the C-wide latents, which is what makes MLA decode memory-light.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_pd.config.model import ModelConfig
from moe_pd.kvcache.paged import AttentionBatch, gather_latent, write_latent
from moe_pd.model.norm import RMSNorm
from moe_pd.model.rope import RotaryEmbedding, apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = rotary  # shared by every layer; it holds no persistent state
        h, d = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=False)

    def project(self, x_TD: torch.Tensor, batch: AttentionBatch):
        """Query heads and this step's cache rows: (q_nope_THN, q_pe_THR, latent_TC, k_pe_TR)."""
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q = self.q_proj(x_TD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD)))
        q_THK = q.view(x_TD.shape[0], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope_THN, q_pe_THR = q_THK.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent_TC, k_pe_TR = self.kv_a_proj_with_mqa(x_TD).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent_TC = self.kv_a_layernorm(latent_TC)
        cos, sin = batch.cached("rope", lambda: self.rotary(batch.positions_T))  # one per step, every layer
        # The query heads' rope parts and the shared rope key rotate together: one call, H + 1 "heads".
        rot_TXR = apply_rope(torch.cat((q_pe_THR, k_pe_TR[:, None, :]), dim=1), cos, sin, cfg.rope_interleave)
        return q_nope_THN, rot_TXR[:, :-1], latent_TC, rot_TXR[:, -1]

    ops = None
    """moe_pd.model.ops implementation (set by DeepseekForCausalLM.use_ops); with a decode kernel, decode
    steps attend straight from the paged cache."""

    def forward(self, x_TD: torch.Tensor, batch: AttentionBatch, cache_PSW: torch.Tensor,
                mode: str = "auto") -> torch.Tensor:
        return self.core(self.prepare(x_TD, batch, cache_PSW), batch, cache_PSW, mode)

    def prepare(self, x_TD: torch.Tensor, batch: AttentionBatch, cache_PSW: torch.Tensor):
        """Projections, rope and the cache write (the decode pipeline's ATTN-0); returns the query heads."""
        if x_TD.shape[0] == 0:
            return None
        q_nope_THN, q_pe_THR, latent_TC, k_pe_TR = self.project(x_TD, batch)
        write_latent(cache_PSW, batch.slot_mapping_T, latent_TC, k_pe_TR)
        return q_nope_THN, q_pe_THR, x_TD.dtype

    def core(self, prepared, batch: AttentionBatch, cache_PSW: torch.Tensor, mode: str = "auto") -> torch.Tensor:
        """Attention over the cache and the output projection (ATTN-1, without the gate)."""
        if prepared is None:
            return cache_PSW.new_zeros(0, self.cfg.hidden_size, dtype=self.o_proj.weight.dtype)
        q_nope_THN, q_pe_THR, dtype = prepared
        if mode in ("auto", "absorbed") and batch.decodes and self.ops is not None and self.ops.has_mla_decode:
            return self._absorbed_decode_kernel(q_nope_THN, q_pe_THR, batch, cache_PSW)
        if mode == "auto":
            mode = "absorbed" if batch.decodes else "expanded"
        attend = {"expanded": self._expanded, "absorbed": self._absorbed}[mode]
        kv_BLW, key_valid_BL = gather_latent(cache_PSW, batch)
        kv_BLW = kv_BLW.to(dtype)
        if batch.is_decode:  # one query per sequence, rows in sequence order: nothing to pad or gather
            out_BQHV = attend(q_nope_THN[:, None], q_pe_THR[:, None], kv_BLW, key_valid_BL[:, None, :])
            return self.o_proj(out_BQHV.flatten(1))

        if _plain_causal(batch):  # fresh prompts of one length: the mask is the causal triangle, no padding
            shape = (batch.num_seqs, batch.max_query_len)
            out_BQHV = attend(q_nope_THN.unflatten(0, shape), q_pe_THR.unflatten(0, shape), kv_BLW, None)
            return self.o_proj(out_BQHV.flatten(0, 1).flatten(1))
        device = kv_BLW.device
        q_off_Q = torch.arange(batch.max_query_len, device=device)
        if batch.verify:  # Q queries per sequence, rows sequence-major: causal over the cache, nothing to pad
            shape = (batch.num_seqs, batch.max_query_len)
            allowed_BQL = batch.cached("verify_mask", lambda: _verify_mask(batch, key_valid_BL))  # every layer's
            out_BQHV = attend(q_nope_THN.unflatten(0, shape), q_pe_THR.unflatten(0, shape), kv_BLW, allowed_BQL)
            return self.o_proj(out_BQHV.flatten(0, 1).flatten(1))
        # Pad the step's queries per sequence: [B, Q, ...]; row order of T is sequence-major.
        q_valid_BQ = q_off_Q[None, :] < batch.query_lens_B[:, None]
        q_row_BQ = torch.where(q_valid_BQ, batch.query_starts_B[:, None] + q_off_Q[None, :], 0)
        q_pos_BQ = (batch.seq_lens_B - batch.query_lens_B)[:, None] + q_off_Q[None, :]
        key_pos_L = torch.arange(batch.max_seq_len, device=device)
        allowed_BQL = key_valid_BL[:, None, :] & (key_pos_L[None, None, :] <= q_pos_BQ[:, :, None])
        out_BQHV = attend(q_nope_THN[q_row_BQ], q_pe_THR[q_row_BQ], kv_BLW, allowed_BQL)
        return self.o_proj(out_BQHV[q_valid_BQ].flatten(1))

    def _absorbed_decode_kernel(self, q_nope_THN, q_pe_THR, batch: AttentionBatch, cache_PSW: torch.Tensor):
        """Decode (Q = 1 query per sequence) or verification (Q equal per sequence), rows in sequence order:
        the absorbed form with the attention itself in the paged-cache kernel, a sequence's Q queries packed
        into its head axis."""
        cfg = self.cfg
        h, queries = cfg.num_attention_heads, max(batch.max_query_len, 1)
        w_HXC = self.kv_b_proj.weight.view(h, -1, cfg.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
        q_latent_THC = torch.einsum("thn,hnc->thc", q_nope_THN, w_uk_HNC)
        q_pe_BXR = q_pe_THR.to(q_latent_THC.dtype).reshape(-1, queries * h, q_pe_THR.shape[-1])
        out_latent_BXC = self.ops.mla_decode(q_latent_THC.reshape(-1, queries * h, cfg.kv_lora_rank), q_pe_BXR,
                                             cache_PSW, batch.block_tables_BM, batch.seq_lens_B,
                                             self.rotary.softmax_scale, queries=queries)
        out_latent_THC = out_latent_BXC.view(-1, h, cfg.kv_lora_rank)
        return self.o_proj(torch.einsum("thc,hvc->thv", out_latent_THC, w_uv_HVC).flatten(1))

    def _expanded(self, q_nope_BQHN, q_pe_BQHR, kv_BLW, allowed_BQL):
        """Per-head keys and values rebuilt from the latents, attended with SDPA (allowed None: causal)."""
        cfg = self.cfg
        heads = cfg.num_attention_heads
        latent_BLC, k_pe_BLR = kv_BLW.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv_BLHX = self.kv_b_proj(latent_BLC).unflatten(-1, (heads, -1))
        k_nope_BLHN, v_BLHV = kv_BLHX.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q_BHQK = torch.cat((q_nope_BQHN, q_pe_BQHR), dim=-1).transpose(1, 2)
        k_pe_BLHR = k_pe_BLR[:, :, None, :].expand(-1, -1, heads, -1)
        k_BHLK = torch.cat((k_nope_BLHN, k_pe_BLHR), dim=-1).transpose(1, 2)
        # One head width for q, k and v lets torch take its fused (flash) kernel; zero columns change nothing.
        width = max(cfg.qk_head_dim, cfg.v_head_dim)
        q_BHQK, k_BHLK = (F.pad(t, (0, width - cfg.qk_head_dim)) for t in (q_BHQK, k_BHLK))
        v_BHLV = F.pad(v_BLHV, (0, width - cfg.v_head_dim)).transpose(1, 2)
        mask = None if allowed_BQL is None else allowed_BQL[:, None]
        out_BHQV = F.scaled_dot_product_attention(q_BHQK, k_BHLK, v_BHLV, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.rotary.softmax_scale)
        return out_BHQV[..., : cfg.v_head_dim].transpose(1, 2)

    def _absorbed(self, q_nope_BQHN, q_pe_BQHR, kv_BLW, allowed_BQL):
        """W_UK folded into the query and W_UV into the output; the scores come from one product over
        [latent | rope key]. Batched matmuls over (sequence) and (head), with Q x H query rows per sequence."""
        cfg = self.cfg
        b, q, h, _ = q_nope_BQHN.shape
        c = cfg.kv_lora_rank
        if allowed_BQL is None:
            allowed_BQL = torch.ones(q, kv_BLW.shape[1], dtype=torch.bool, device=kv_BLW.device).tril()[None]
        w_HXC = self.kv_b_proj.weight.view(h, -1, c)
        w_uk_HNC, w_uv_HVC = w_HXC.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
        q_latent_HMC = torch.bmm(q_nope_BQHN.reshape(b * q, h, -1).transpose(0, 1), w_uk_HNC)  # M = B * Q
        q_BXW = torch.cat((q_latent_HMC.transpose(0, 1).reshape(b, q * h, c),
                           q_pe_BQHR.reshape(b, q * h, -1).to(q_latent_HMC.dtype)), dim=-1)  # X = Q * H
        scores_BQHL = torch.bmm(q_BXW, kv_BLW.transpose(1, 2)).view(b, q, h, -1).float() * self.rotary.softmax_scale
        scores_BQHL = scores_BQHL.masked_fill(~allowed_BQL[:, :, None, :], float("-inf"))
        probs_BXL = scores_BQHL.softmax(dim=-1).to(kv_BLW.dtype).view(b, q * h, -1)
        out_latent_BXC = torch.bmm(probs_BXL, kv_BLW[..., :c])
        out_HMV = torch.bmm(out_latent_BXC.view(b * q, h, c).transpose(0, 1), w_uv_HVC.transpose(1, 2))
        return out_HMV.transpose(0, 1).reshape(b, q, h, -1)


def _verify_mask(batch: AttentionBatch, key_valid_BL: torch.Tensor) -> torch.Tensor:
    """Query q of a verification's Q per sequence sees the cached keys up to its own position."""
    device = key_valid_BL.device
    q_pos_BQ = (batch.seq_lens_B - batch.max_query_len)[:, None] + torch.arange(batch.max_query_len, device=device)
    key_pos_L = torch.arange(key_valid_BL.shape[1], device=device)
    return key_valid_BL[:, None, :] & (key_pos_L[None, None, :] <= q_pos_BQ[:, :, None])


def _plain_causal(batch: AttentionBatch) -> bool:
    """Every sequence starts from an empty cache and adds the same number of tokens (a fresh prefill of
    equal prompts): queries and keys line up one to one and the mask is the causal triangle."""
    queries, contexts = batch.host_query_lens, batch.host_context_lens
    return bool(queries) and not any(contexts) and min(queries) == max(queries) == batch.max_seq_len
