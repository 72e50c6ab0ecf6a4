"""Tiny transformers DeepseekV3/V2 models with random weights, saved as HF checkpoints: the oracle."""

from __future__ import annotations

from pathlib import Path

import torch

V3_CONFIGS = {
    # q LoRA, 4 groups, 1 shared expert, YaRN, interleaved rope.
    "v3_lora_groups_yarn": dict(
        q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # No q LoRA, one group, 2 shared experts, plain RoPE, halves layout.
    "v3_nolora_1group_plain": dict(
        q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=False,
    ),
}

V2_CONFIGS = {
    # V2-Lite style: softmax, greedy, no q LoRA, 2 shared, YaRN with mscale 0.707.
    "v2_lite_greedy_yarn": dict(
        q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None, n_shared_experts=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # V2 style: q LoRA, group-limited greedy over 4 groups, 1 shared, plain rope.
    "v2_lora_grouped_plain": dict(
        q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
    max_position_embeddings=256, initializer_range=0.2, bos_token_id=0, eos_token_id=1,
    tie_word_embeddings=False,
)


def make_hf_model(name: str, seed: int = 0, **overrides):
    import transformers

    common = {**COMMON, **overrides}
    if name in V3_CONFIGS:
        cfg = transformers.DeepseekV3Config(**common, **V3_CONFIGS[name], routed_scaling_factor=2.5,
                                            num_nextn_predict_layers=0)
        cls = transformers.DeepseekV3ForCausalLM
    else:
        cfg = transformers.DeepseekV2Config(**common, **V2_CONFIGS[name], routed_scaling_factor=1.5)
        cls = transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # randomise norms so a missing or misplaced one shows
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def save_hf_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path
