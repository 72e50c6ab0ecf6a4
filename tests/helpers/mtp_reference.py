"""The oracle for the MTP module: DeepSeek's published MTP (DeepSeek-V3 technical report, section 2.2) in plain
torch around transformers' DeepseekV3 decoder layer, and checkpoints that carry an MTP layer.

transformers' DeepseekV3ForCausalLM has no MTP module, but its model runs only `config.num_hidden_layers` of
its layers: a model built with N + 1 layers and run with N is the main model, and its layer N is a full
decoder layer in DeepSeek's checkpoint format, i.e. the MTP module's Transformer block. `make_mtp_checkpoint`
saves such a model as a DeepSeek-V3 checkpoint with N layers plus MTP layer N (enorm, hnorm, eh_proj, the
block, copies of the embedding and head, shared_head.norm); `ReferenceMTP` computes the module's logits:
  h'_i = eh_proj([RMSNorm_e(Emb(t_{i+1})); RMSNorm_h(h_i)])   (embedding first, as the released weights expect)
  logits_i = head(RMSNorm_shared(Block(h'_0..h'_i)))           (predicting t_{i+2})
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from helpers.hf_models import make_hf_model


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def make_mtp_checkpoint(path: Path, name: str = "v3_lora_groups_yarn", seed: int = 0):
    """Returns (transformers model of N + 1 layers running N, its MTP tensors by checkpoint name, path)."""
    hf = make_hf_model(name, seed, num_hidden_layers=4)
    hf.save_pretrained(path)
    n, d = 3, hf.config.hidden_size
    tensors = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(seed + 7)
    prefix = f"model.layers.{n}."
    extra = {
        "enorm.weight": 1.0 + 0.3 * torch.randn(d, generator=gen),
        "hnorm.weight": 1.0 + 0.3 * torch.randn(d, generator=gen),
        "eh_proj.weight": 0.15 * torch.randn(d, 2 * d, generator=gen),
        "shared_head.norm.weight": 1.0 + 0.3 * torch.randn(d, generator=gen),
        "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        "shared_head.head.weight": tensors["lm_head.weight"].clone(),
    }
    tensors.update({prefix + k: v for k, v in extra.items()})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    hf.config.num_hidden_layers = n
    return hf, {k: v for k, v in tensors.items() if k.startswith(prefix)}, path


class ReferenceMTP:
    def __init__(self, hf, tensors: dict[str, torch.Tensor]) -> None:
        self.hf, self.n = hf, hf.config.num_hidden_layers
        self.w = {k.split(".", 3)[3]: v.float() for k, v in tensors.items()}
        self.eps = hf.config.rms_norm_eps

    @torch.no_grad()
    def main_states(self, ids: list[int]) -> torch.Tensor:
        """The main model's normalised output states [T, D] (transformers, N layers)."""
        return self.hf.model(torch.tensor([ids])).last_hidden_state[0]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T - 1, V]: row i predicts token i + 2 from the main state of i and token i + 1."""
        from transformers.masking_utils import create_causal_mask

        h = self.main_states(ids)[:-1]
        w = self.w
        e = torch.nn.functional.embedding(torch.tensor(ids[1:]), w["embed_tokens.weight"])
        x = torch.cat([_rms(e, w["enorm.weight"], self.eps), _rms(h, w["hnorm.weight"], self.eps)], dim=-1)
        x = (x @ w["eh_proj.weight"].T)[None]
        positions = torch.arange(x.shape[1])[None]
        mask = create_causal_mask(config=self.hf.config, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=positions)
        block = self.hf.model.layers[self.n]
        y = block(x, attention_mask=mask, position_ids=positions,
                  position_embeddings=self.hf.model.rotary_emb(x, positions))[0]
        return _rms(y, w["shared_head.norm.weight"], self.eps) @ w["shared_head.head.weight"].T
