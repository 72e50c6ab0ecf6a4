"""DeepSeek-V3 / V2 decoder stack. Legend: T tokens, D hidden, V vocab.

Module names equal transformers' / the HF checkpoint's (`model.layers.N.self_attn.q_a_proj`, ...) so
loading is a name lookup; routed experts are the one exception (stacked by local slot, see experts.py).
Parallelism is injected: `expert_ids` says which routed experts this rank holds and `dispatcher` moves
tokens to them; nothing here knows about ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.profiler import record_function

from moe_pd.config.model import ModelConfig
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.experts import DenseMLP, RoutedExperts
from moe_pd.model.gate import Gate
from moe_pd.model.mla import MLA
from moe_pd.model.moe import MoE
from moe_pd.model.mtp import MTPLayer
from moe_pd.model.norm import RMSNorm
from moe_pd.model.rope import RotaryEmbedding
from moe_pd.parallel.dispatch.base import Dispatcher
from moe_pd.parallel.dispatch.local import LocalDispatcher

ExpertIds = Sequence[int] | Callable[[int], Sequence[int]]
_NO_RANGE = nullcontext()


# Stages of a decoder layer, in order. The decode pipeline yields after each of the first five (DeepSeek's
# five-stage pipeline: ATTN-0 | ATTN-1 | dispatch + SHARED | MLP | combine | output); prefill yields only
# after SHARED and MLP. Run back to back, they are the plain forward.
STAGES = ("ATTN-0", "ATTN-1", "SHARED", "MLP", "COMBINE", "OUTPUT")


@dataclass
class StageState:
    """One micro-batch's activations between stages."""

    hidden_TD: torch.Tensor
    batch: AttentionBatch
    cache: PagedLatentCache
    attn_mode: str = "auto"
    label: str = ""
    """Micro-batch label in profiler ranges, e.g. '(1)'; empty for the plain forward."""
    scratch: dict = field(default_factory=dict)


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
        self._stages: list[Callable[[StageState], None]] | None = None

    def forward(self, x_TD: torch.Tensor, batch: AttentionBatch, cache: PagedLatentCache,
                attn_mode: str = "auto") -> torch.Tensor:
        state = StageState(x_TD, batch, cache, attn_mode)
        for stage in self.stages():
            stage(state)
        return state.hidden_TD

    def _range(self, s: StageState, name: str):
        if not torch._C._autograd._profiler_enabled():  # entering a range costs more than some stages
            return _NO_RANGE
        return record_function(f"L{self.layer_idx} {name}{s.label}")

    def stages(self) -> list[Callable[[StageState], None]]:
        """The layer as six stage functions over a StageState (names in STAGES), built once: they hold no
        per-step state, so every forward reuses them."""
        if self._stages is None:
            self._stages = self._build_stages()
        return self._stages

    def _build_stages(self) -> list[Callable[[StageState], None]]:
        moe = self.mlp if isinstance(self.mlp, MoE) else None

        def attn_prepare(s: StageState) -> None:
            with self._range(s, "ATTN-0"):
                v = s.scratch
                v["residual"] = s.hidden_TD
                v["attn"] = self.self_attn.prepare(self.input_layernorm(s.hidden_TD), s.batch,
                                                   s.cache.layer(self.layer_idx))

        def attn_core_gate(s: StageState) -> None:
            with self._range(s, "ATTN-1"):
                v = s.scratch
                attn_TD = self.self_attn.core(v.pop("attn"), s.batch, s.cache.layer(self.layer_idx), s.attn_mode)
                v["residual"] = v["residual"] + attn_TD
                v["x"] = self.post_attention_layernorm(v["residual"])
                if moe is not None:
                    v["route"] = moe.gate(v["x"])

        def dispatch_shared(s: StageState) -> None:
            v = s.scratch
            if moe is None:
                return
            with self._range(s, "DISPATCH"):
                v["pending"] = moe.dispatch_start(v["x"], *v.pop("route"))
            with self._range(s, "SHARED"):
                v["shared"] = moe.shared(v["x"])

        def experts(s: StageState) -> None:
            v = s.scratch
            if moe is None:
                with self._range(s, "MLP"):
                    v["mlp_out"] = self.mlp(v.pop("x"))
                return
            with self._range(s, "DISPATCH-WAIT"):
                routed = moe.dispatch_wait(v.pop("pending"))
            with self._range(s, "MLP"):
                y_ND = moe.routed(routed)
            with self._range(s, "COMBINE"):
                v["pending"] = moe.combine_start(y_ND, routed)

        def combine(s: StageState) -> None:
            v = s.scratch
            if moe is not None:
                with self._range(s, "COMBINE-WAIT"):
                    v["mlp_out"] = moe.output(moe.combine_wait(v.pop("pending")), v.pop("shared"))

        def output(s: StageState) -> None:
            v = s.scratch
            with self._range(s, "OUTPUT"):
                s.hidden_TD = v.pop("residual") + v.pop("mlp_out")
                v.pop("x", None)

        return [attn_prepare, attn_core_gate, dispatch_shared, experts, combine, output]


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
                 dispatcher: Dispatcher | None = None, num_mtp_layers: int = 0) -> None:
        """`expert_ids`: the global (logical) expert id of each local slot, one list for every MoE layer or
        a function of the layer index; default all experts. `dispatcher` defaults to the local one.
        `num_mtp_layers`: MTP modules to build (`self.mtp`, see moe_pd.model.mtp), at most the config's."""
        super().__init__()
        self.cfg = cfg
        if expert_ids is None:
            expert_ids = list(range(cfg.n_routed_experts))
        ids_of_layer = expert_ids if callable(expert_ids) else (lambda _layer, ids=list(expert_ids): ids)
        dispatcher = dispatcher or LocalDispatcher(cfg.n_routed_experts)
        self.model = DeepseekBackbone(cfg, ids_of_layer, dispatcher)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ops = None
        """The moe_pd.model.ops implementation in use (None: the torch references); see use_ops."""
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not 0 <= num_mtp_layers <= cfg.num_nextn_predict_layers:
            raise ValueError(f"num_mtp_layers={num_mtp_layers}: the model has {cfg.num_nextn_predict_layers} "
                             f"MTP layers (model.num_nextn_predict_layers)")
        self.mtp = nn.ModuleList(
            MTPLayer(cfg, DecoderLayer(cfg, i, self.model.rotary, ids_of_layer(i), dispatcher),
                     self.model.embed_tokens, self.lm_head)
            for i in range(cfg.num_hidden_layers, cfg.num_hidden_layers + num_mtp_layers))
        """MTP modules (draft models of speculative decoding), model layers num_hidden_layers, ..."""

    def use_ops(self, ops) -> "DeepseekForCausalLM":
        """Points the gate, expert and attention modules at `ops` (moe_pd.model.ops.select_ops)."""
        for module in self.modules():
            if isinstance(module, (Gate, RoutedExperts, MLA)):
                module.ops = ops
        self.ops = ops
        return self

    @property
    def num_cache_layers(self) -> int:
        """Layers of the paged latent cache this model writes: the decoder layers, then the MTP layers."""
        return self.cfg.num_hidden_layers + len(self.mtp)

    def moe_layers(self) -> dict[int, MoE]:
        """Every MoE block by model layer index, the MTP layers' included (what EPLB places and moves)."""
        layers = [*self.model.layers, *(m.block for m in self.mtp)]
        return {layer.layer_idx: layer.mlp for layer in layers if isinstance(layer.mlp, MoE)}

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

    def mtp_forward(self, input_ids_T: torch.Tensor, previous_TD: torch.Tensor, batch: AttentionBatch,
                    cache: PagedLatentCache, depth: int = 0, attn_mode: str = "auto") -> torch.Tensor:
        """MTP module `depth` (moe_pd.model.mtp.MTPLayer.forward): row t takes the token at position p + 1
        and the state of position p (the batch's position of row t); returns its normalised output state,
        whose `logits` predict the token at p + 2."""
        return self.mtp[depth](input_ids_T, previous_TD, batch, cache, attn_mode)
