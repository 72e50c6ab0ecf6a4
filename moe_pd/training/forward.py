"""A training forward of moe_pd's own DeepseekForCausalLM modules: whole sequences, no paged cache.

Legend: B sequences, S positions, D hidden, H heads, V vocab.

Serving runs the model over a paged latent cache one step at a time; training runs B full sequences at once,
so attention here is the expanded MLA form (kv_b_proj rebuilds per-head keys and values from the latents,
the rope key shared by every head) under a causal mask, through torch's scaled_dot_product_attention. Every
other piece is the served module itself (projections and rope, the gate's routing, the MoE dispatcher and
experts, the MTP module's input projection and head), so the trained tensors are the served ones by
construction; tests/unit/test_training.py checks these logits against the paged forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_pd.model.moe import MoE
from moe_pd.model.mtp import MTPLayer
from moe_pd.model.transformer import DecoderLayer, DeepseekForCausalLM


class _Positions:
    """What MLA.project reads of an AttentionBatch: the rows' positions (and the per-step memo it shares
    between layers, which a training forward does not need)."""

    def __init__(self, positions_T: torch.Tensor) -> None:
        self.positions_T = positions_T

    @staticmethod
    def cached(key: str, make):
        return make()


def attention(layer: DecoderLayer, x_BSD: torch.Tensor, positions_S: torch.Tensor) -> torch.Tensor:
    attn, cfg = layer.self_attn, layer.self_attn.cfg
    b, s, _ = x_BSD.shape
    h = cfg.num_attention_heads
    q_nope, q_pe, latent, k_pe = attn.project(x_BSD.reshape(b * s, -1), _Positions(positions_S.repeat(b)))
    kv = attn.kv_b_proj(latent).view(b, s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).view(b, s, h, cfg.qk_head_dim)
    k = torch.cat([k_nope, k_pe.view(b, s, 1, -1).expand(b, s, h, -1)], dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=attn.rotary.softmax_scale)
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, h * cfg.v_head_dim))


def mlp(layer: DecoderLayer, x_TD: torch.Tensor) -> torch.Tensor:
    """The dense MLP, or the MoE block's pieces in the order DecoderLayer.stages runs them."""
    moe = layer.mlp
    if not isinstance(moe, MoE):
        return moe(x_TD)
    pending = moe.dispatch_start(x_TD, *moe.gate(x_TD))
    shared_TD = moe.shared(x_TD)
    routed = moe.dispatch_wait(pending)
    return moe.output(moe.combine_wait(moe.combine_start(moe.routed(routed), routed)), shared_TD)


def decoder_layer(layer: DecoderLayer, x_BSD: torch.Tensor, positions_S: torch.Tensor) -> torch.Tensor:
    x_BSD = x_BSD + attention(layer, layer.input_layernorm(x_BSD), positions_S)
    y_BSD = layer.post_attention_layernorm(x_BSD)
    return x_BSD + mlp(layer, y_BSD.flatten(0, 1)).view_as(y_BSD)


def main_states(model: DeepseekForCausalLM, ids_BS: torch.Tensor) -> torch.Tensor:
    """The main model's normalised output states [B, S, D] (what the head and the MTP module read)."""
    positions_S = torch.arange(ids_BS.shape[1], device=ids_BS.device)
    x_BSD = model.model.embed_tokens(ids_BS)
    for layer in model.model.layers:
        x_BSD = decoder_layer(layer, x_BSD, positions_S)
    return model.model.norm(x_BSD)


def mtp_states(mtp: MTPLayer, next_ids_BS: torch.Tensor, previous_BSD: torch.Tensor) -> torch.Tensor:
    """The MTP module over whole sequences: position i takes the state of i and the token at i + 1."""
    positions_S = torch.arange(next_ids_BS.shape[1], device=next_ids_BS.device)
    x_BSD = mtp.project_input(next_ids_BS.flatten(), previous_BSD.flatten(0, 1)).view_as(previous_BSD)
    return mtp.shared_head.norm(decoder_layer(mtp.block, x_BSD, positions_S))


def losses(model: DeepseekForCausalLM, tokens_BS1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss, MTP loss) on sequences of S + 1 tokens: the main model predicts token i + 1 at
    position i; the MTP module (depth 1) predicts token i + 2 from the main state at i and token i + 1."""
    inputs, targets = tokens_BS1[:, :-1], tokens_BS1[:, 1:]
    states = main_states(model, inputs)
    main = F.cross_entropy(model.logits(states).flatten(0, 1), targets.flatten())
    mtp = model.mtp[0]
    drafted = mtp_states(mtp, inputs[:, 1:], states[:, :-1])
    extra = F.cross_entropy(mtp.logits(drafted).flatten(0, 1), targets[:, 1:].flatten())
    return main, extra
