"""DeepSeek-V3's multi-token-prediction (MTP) module, as a draft model for speculative decoding.

Legend: T tokens, D hidden, V vocab.

DeepSeek-V3 technical report (arXiv:2412.19437), section 2.2: MTP module k takes, for position i, the
previous depth's representation h_i (depth 0: the main model's output) and the embedding of the token at
i + k, normalises each (RMSNorm), concatenates them, projects 2D -> D (`eh_proj`), runs one full Transformer
block and predicts token i + k + 1 through the output head. The embedding and the output head are shared with
the main model. Checkpoints store module k as layer `num_hidden_layers + k`: `enorm`, `hnorm`, `eh_proj`, the
decoder layer's own tensors (`self_attn.*`, `mlp.*`, both layer norms), plus `embed_tokens` and
`shared_head.{norm,head}` (copies of the main model's embedding and head, and the head's own norm). Here the
decoder layer is `block` (a DecoderLayer built by the model), so `checkpoint_name` maps `mtp.{k}.block.x` and
`mtp.{k}.x` both to `model.layers.{N + k}.x`.

Two conventions where the report is silent or differs from the released weights, both as SGLang's
`deepseek_nextn.py` and vLLM's `deepseek_mtp.py` run DeepSeek-V3's checkpoints:
- `eh_proj` takes [enorm(embedding); hnorm(hidden)], embedding first (the report writes the reverse order);
- the module's output is `shared_head.norm` applied to the block's output; the logits are `head` of it, and
  a chain draft (the one module reused for the next position) feeds this normalised state back as the next
  h, the way the main model's (also normalised) output was fed to it (SGLang's chain; vLLM feeds the state
  before the norm).
Each MTP layer has its own latent-cache layer (index `layer_idx` in the shared paged cache), addressed by the
same block tables as the main layers: the MTP entry of position i sits next to the main model's.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_pd.config.model import ModelConfig
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, head: nn.Linear) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = head


class MTPLayer(nn.Module):
    """One MTP module around its decoder layer `block` (any module with the DecoderLayer forward, at layer
    index num_hidden_layers + k). `embed_tokens` and `shared_head.head` are the main model's modules."""

    def __init__(self, cfg: ModelConfig, block: nn.Module, embed_tokens: nn.Embedding, lm_head: nn.Linear) -> None:
        super().__init__()
        self.block = block
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.embed_tokens = embed_tokens
        self.shared_head = SharedHead(cfg, lm_head)

    @property
    def layer_idx(self) -> int:
        return self.block.layer_idx

    def project_input(self, input_ids_T: torch.Tensor, previous_TD: torch.Tensor) -> torch.Tensor:
        embedded_TD = self.enorm(self.embed_tokens(input_ids_T))
        return self.eh_proj(torch.cat([embedded_TD, self.hnorm(previous_TD.to(embedded_TD.dtype))], dim=-1))

    def forward(self, input_ids_T: torch.Tensor, previous_TD: torch.Tensor, batch: AttentionBatch,
                cache: PagedLatentCache, attn_mode: str = "auto") -> torch.Tensor:
        """Row t: the token at position p + 1 and the representation of position p, where p is the batch's
        position of row t (its rope position and cache slot). Returns the normalised output state."""
        x_TD = self.block(self.project_input(input_ids_T, previous_TD), batch, cache, attn_mode)
        return self.shared_head.norm(x_TD)

    def logits(self, state_TD: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(state_TD).float()


MTP_PREFIX = "mtp."


def checkpoint_name(name: str, cfg: ModelConfig) -> str:
    """Our parameter name -> the checkpoint's: `mtp.{k}.block.x` and `mtp.{k}.x` are
    `model.layers.{num_hidden_layers + k}.x`."""
    if not name.startswith(MTP_PREFIX):
        return name
    depth, rest = name[len(MTP_PREFIX):].split(".", 1)
    return f"model.layers.{cfg.num_hidden_layers + int(depth)}.{rest.removeprefix('block.')}"
