"""DeepSeek-V3 / V2 decoder stack. Legend: T tokens, D hidden, V vocab.

Module names equal transformers' / the HF checkpoint's (`model.layers.N.self_attn.q_a_proj`, ...) so
loading is a name lookup; routed experts are the one exception (stacked by local slot, see experts.py).
Parallelism is injected: `expert_ids` says which routed experts this rank holds and `dispatcher` moves
tokens to them; nothing here knows about ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from moe_pd.config.model import ModelConfig
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.experts import DenseMLP
from moe_pd.model.mla import MLA
from moe_pd.model.moe import MoE
from moe_pd.model.norm import RMSNorm
from moe_pd.model.rope import RotaryEmbedding
from moe_pd.parallel.dispatch.base import Dispatcher
from moe_pd.parallel.dispatch.local import LocalDispatcher

ExpertIds = Sequence[int] | Callable[[int], Sequence[int]]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding,
                 expert_ids: Sequence[int], dispatcher: Dispatcher) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (MoE(cfg, layer_idx, expert_ids, dispatcher) if cfg.is_moe_layer(layer_idx)
                    else DenseMLP(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, x_TD: torch.Tensor, batch: AttentionBatch, cache: PagedLatentCache,
                attn_mode: str = "auto") -> torch.Tensor:
        x_TD = x_TD + self.self_attn(self.input_layernorm(x_TD), batch, cache.layer(self.layer_idx), attn_mode)
        return x_TD + self.mlp(self.post_attention_layernorm(x_TD))


class DeepseekBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_ids: Callable[[int], Sequence[int]], dispatcher: Dispatcher) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.rotary, expert_ids(i) if cfg.is_moe_layer(i) else [], dispatcher)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """forward(token ids of one step, its AttentionBatch, the cache) -> hidden states of every token;
    `logits` applies the head to the rows you need (usually each sequence's last token)."""

    def __init__(self, cfg: ModelConfig, expert_ids: ExpertIds | None = None,
                 dispatcher: Dispatcher | None = None) -> None:
        """`expert_ids`: the global (logical) expert id of each local slot, one list for every MoE layer or
        a function of the layer index; default all experts. `dispatcher` defaults to the local one."""
        super().__init__()
        self.cfg = cfg
        if expert_ids is None:
            expert_ids = list(range(cfg.n_routed_experts))
        ids_of_layer = expert_ids if callable(expert_ids) else (lambda _layer, ids=list(expert_ids): ids)
        dispatcher = dispatcher or LocalDispatcher(cfg.n_routed_experts)
        self.model = DeepseekBackbone(cfg, ids_of_layer, dispatcher)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def expert_ids(self) -> list[int]:
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                return layer.mlp.experts.expert_ids
        return []

    def forward(self, input_ids_T: torch.Tensor, batch: AttentionBatch, cache: PagedLatentCache,
                attn_mode: str = "auto") -> torch.Tensor:
        x_TD = self.model.embed_tokens(input_ids_T)
        for layer in self.model.layers:
            x_TD = layer(x_TD, batch, cache, attn_mode)
        return self.model.norm(x_TD)

    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_TD).float()
