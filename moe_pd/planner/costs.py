"""The work in one layer of a DeepSeek-V3-architecture model, per token: FLOPs, weights, bytes on the wire.

Notation of the DeepSeek-V3 report (arXiv 2412.19437, section 2.1): D hidden size, H heads, d_c the KV
latent (kv_lora_rank), d_q the query latent (q_lora_rank; none projects queries directly), d_h the per-head
query/key width without rope, d_r the rope width, d_v the per-head value width, E routed experts of width F
with K chosen per token, I the dense MLP width, V the vocabulary. A matrix product of [M, k] by [k, n] is
2*M*k*n FLOPs and reads k*n weights. SwiGLU MLPs have three k*n matrices (gate, up, down).

MLA runs in two forms: prefill expands the latent into per-head keys and values (d_h + d_r for QK, d_v for
PV), decode absorbs W_UK into the query and W_UV into the output and attends over the cached latent
directly (d_c + d_r for QK, d_c for PV), reading d_c + d_r cached values per token and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.model import ModelConfig

FP8_SCALE_BLOCK = 128  # activations are quantised per token and 128 channels, one fp32 scale each


@dataclass(frozen=True)
class LayerCosts:
    """Per-token costs of one model, derived once from its config and weight format."""

    cfg: ModelConfig
    weight_bytes: float
    """Bytes per GEMM weight: 1 for FP8 (block scales are 1/16384 of it, ignored), 2 for BF16, 4 for fp32."""
    mtp_layers: int = 0
    """MTP modules the checkpoint ships (each one more decoder layer plus a 2D -> D projection)."""

    # --- parameters -------------------------------------------------------------------------------------
    @property
    def attn_params(self) -> int:
        """W_DQ, W_UQ (or W_Q), W_DKV + W_KR, W_UK + W_UV, W_O of one MLA layer."""
        c = self.cfg
        qk = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank * qk if c.q_lora_rank else c.hidden_size * qk
        kv_down = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
        kv_up = c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
        out = c.num_attention_heads * c.v_head_dim * c.hidden_size
        return q + kv_down + kv_up + out

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.cfg.hidden_size * self.cfg.intermediate_size

    @property
    def expert_params(self) -> int:
        """One routed expert."""
        return 3 * self.cfg.hidden_size * self.cfg.moe_intermediate_size

    @property
    def shared_params(self) -> int:
        return self.cfg.n_shared_experts * self.expert_params

    @property
    def gate_params(self) -> int:
        return self.cfg.hidden_size * self.cfg.n_routed_experts

    @property
    def vocab_params(self) -> int:
        """One of the embedding and the LM head (BF16 in DeepSeek's checkpoints)."""
        return self.cfg.vocab_size * self.cfg.hidden_size

    @property
    def mtp_proj_params(self) -> int:
        """The MTP module's projection of [h; emb] (2D) back to D."""
        return 2 * self.cfg.hidden_size * self.cfg.hidden_size

    # --- FLOPs per token ----------------------------------------------------------------------------------
    def gemm_flops(self, params: int) -> float:
        return 2.0 * params

    def prefill_attn_flops(self, context: float) -> float:
        """Core attention of one query over `context` keys, expanded form: QK^T over d_h + d_r, PV over d_v."""
        c = self.cfg
        return 2.0 * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * context

    def decode_attn_flops(self, context: float) -> float:
        """Core attention of one query over `context` cached latents, absorbed form: QK over d_c + d_r, PV
        over d_c."""
        c = self.cfg
        return 2.0 * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * context

    # --- memory -------------------------------------------------------------------------------------------
    def kv_bytes_per_token(self, kv_bytes: int) -> float:
        """Cache of one token over every layer (MTP layers included): the latent and the rope key."""
        c = self.cfg
        return (c.num_hidden_layers + self.mtp_layers) * (c.kv_lora_rank + c.qk_rope_head_dim) * kv_bytes

    def weight_bytes_per_device(self, expert_slots: int) -> float:
        """Weights one device holds with DP attention and `expert_slots` routed experts per MoE layer."""
        c = self.cfg
        layers, moe = c.num_hidden_layers + self.mtp_layers, c.num_moe_layers + self.mtp_layers
        gemm = (layers * self.attn_params + c.first_k_dense_replace * self.dense_mlp_params
                + moe * (self.shared_params + expert_slots * self.expert_params)
                + self.mtp_layers * self.mtp_proj_params)
        bf16 = self.vocab_params * (1 if c.tie_word_embeddings else 2) + moe * self.gate_params
        return gemm * self.weight_bytes + max(2.0, self.weight_bytes) * bf16

    # --- all-to-all -----------------------------------------------------------------------------------------
    def dispatch_bytes(self, fp8: bool, act_bytes: float = 2) -> float:
        """One token's hidden state sent to one destination: FP8 with a fp32 scale per 128 channels (DeepSeek
        dispatches in FP8), else in the activation format."""
        d = self.cfg.hidden_size
        return d + 4 * d / FP8_SCALE_BLOCK if fp8 else act_bytes * d

    def combine_bytes(self, act_bytes: float = 2) -> float:
        """One expert output returned in the activation format (BF16 in DeepSeek's combine)."""
        return act_bytes * self.cfg.hidden_size


def prefill_context(input_len: float, cached: float) -> float:
    """Mean keys a computed prompt token attends to (causal): tokens cached..input_len-1 see i + 1 keys."""
    return (input_len + cached + 1) / 2


def expected_distinct(bins: int, per_bin: float, total: float, picks: int) -> float:
    """Expected distinct bins hit when `picks` of `total` items (spread `per_bin` to a bin) are drawn without
    replacement: bins * (1 - C(total - per_bin, picks) / C(total, picks)), as a product so it takes fractions."""
    if bins <= 1:
        return float(bins)
    miss = 1.0
    for j in range(picks):
        miss *= max(total - per_bin - j, 0.0) / (total - j)
    return bins * (1.0 - miss)


def destinations(cfg: ModelConfig, ranks: int, per_node: int) -> tuple[float, float]:
    """(other nodes, other ranks) one token's K experts reach, in expectation, with experts spread evenly.

    Group-limited routing (V3: 4 of 8 groups) caps the nodes when EPLB keeps groups inside nodes (the
    hierarchical policy, used when the groups divide over the nodes): then the token picks `topk_group`
    of the groups and each node holds n_group / nodes of them."""
    nodes = max(1, -(-ranks // per_node))
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    if cfg.n_group > 1 and nodes > 1 and cfg.n_group % nodes == 0:
        hit_nodes = expected_distinct(nodes, cfg.n_group / nodes, cfg.n_group, cfg.topk_group)
    else:
        hit_nodes = expected_distinct(nodes, E / nodes, E, K)
    hit_ranks = expected_distinct(ranks, E / ranks, E, K)
    # By symmetry the token's own node (rank) is among those hit with probability hit / count.
    return hit_nodes * (1 - 1 / nodes), hit_ranks * (1 - 1 / ranks)
