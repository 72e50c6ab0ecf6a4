"""Reads a checkpoint's config.json into a ModelConfig.

Accepts both spellings in the wild: DeepSeek's released files (`rope_theta` + `rope_scaling` with
`type: yarn`, `scoring_func`, `topk_method`) and what current transformers writes (`rope_parameters`
with `rope_type`, no scoring keys, V2 groups as null).
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from moe_pd.config.errors import ConfigError
from moe_pd.config.model import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScalingConfig

log = logging.getLogger(__name__)

_MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
_ARCH_DEFAULTS = {
    "DeepseekV3ForCausalLM": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "DeepseekV2ForCausalLM": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
                              "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
                              "routed_scaling_factor": 1.0},
}
_ROPE_KEYS = {f.name for f in fields(RopeScalingConfig)} - {"type"}


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"model.path={str(path)!r}: no config.json there")
    with open(file) as f:
        return json.load(f)


def architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), "")
    if arch not in SUPPORTED_ARCHITECTURES:
        name = arch or hf.get("model_type") or "<none>"
        raise ConfigError(
            f"config.json architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScalingConfig | None]:
    params = hf.get("rope_parameters")
    if params:
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
    else:
        params = hf.get("rope_scaling") or {}
        theta = float(hf.get("rope_theta", 10000.0))
        kind = params.get("type", params.get("rope_type", "default")) if params else "default"
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"config.json rope type {kind!r} is not supported; supported: 'default', 'yarn'")
    yarn = {k: params[k] for k in _ROPE_KEYS if params.get(k) is not None}
    return theta, RopeScalingConfig(type="yarn", **yarn)


def model_config_from_hf(hf: dict[str, Any], path: str | None = None) -> ModelConfig:
    """Builds a validated ModelConfig from a parsed config.json."""
    arch = architecture_of(hf)
    if hf.get("attention_bias"):
        raise ConfigError("config.json attention_bias=true is not supported by DeepSeek MLA here")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"config.json moe_layer_freq={hf['moe_layer_freq']} is not supported (only 1)")
    values: dict[str, Any] = dict(_ARCH_DEFAULTS[arch])
    simple = {f.name for f in fields(ModelConfig)} - {"architecture", "path", "rope_scaling", "rope_theta",
                                                      "rope_interleave", "init_seed", "init_std"}
    for key in simple:
        if hf.get(key) is not None:
            values[key] = hf[key]
    if "q_lora_rank" in hf:
        values["q_lora_rank"] = hf["q_lora_rank"]
    values["num_nextn_predict_layers"] = mtp_layers(hf)
    if hf.get("n_shared_experts") is None and "n_shared_experts" in hf:
        values["n_shared_experts"] = 0
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        values["eos_token_id"] = eos[0] if eos else None
        if len(eos) > 1:
            log.warning("config.json lists %d eos ids %s; stopping on the first only", len(eos), eos)
    if "bos_token_id" in hf:
        values["bos_token_id"] = hf["bos_token_id"]
    theta, scaling = _rope(hf)
    interleave = bool(hf.get("rope_interleave", True)) if arch == "DeepseekV3ForCausalLM" else True
    return ModelConfig(
        architecture=arch, path=path, rope_theta=theta, rope_scaling=scaling, rope_interleave=interleave,
        **values,
    )


def fp8_block_size(hf: dict[str, Any]) -> tuple[int, int] | None:
    """The FP8 weight block (rows, columns) from config.json's `quantization_config`, None when the
    checkpoint is not block-quantised FP8 (DeepSeek-V3 ships fp8 with 128x128 blocks)."""
    quant = hf.get("quantization_config") or {}
    if quant.get("quant_method") not in (None, "fp8") or "weight_block_size" not in quant:
        return None
    rows, cols = quant["weight_block_size"]
    return int(rows), int(cols)


def mtp_layers(hf: dict[str, Any]) -> int:
    """Multi-token-prediction modules the checkpoint ships (`num_nextn_predict_layers`, 0 when absent)."""
    return int(hf.get("num_nextn_predict_layers") or 0)


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Returns `cfg` itself, or, when `cfg.path` is set, the architecture read from its config.json."""
    if cfg.path is None:
        return cfg
    hf = read_config_json(cfg.path)
    resolved = model_config_from_hf(hf, path=cfg.path)
    return replace(resolved, init_seed=cfg.init_seed, init_std=cfg.init_std)


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for transformers' DeepseekV3/V2 classes (current spelling, `rope_parameters`)."""
    v3 = cfg.architecture == "DeepseekV3ForCausalLM"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        y = cfg.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": y.factor,
                "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                "original_max_position_embeddings": y.original_max_position_embeddings or cfg.max_position_embeddings}
        rope.update({k: getattr(y, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                     if getattr(y, k) is not None})
    hf: dict[str, Any] = {
        "architectures": [cfg.architecture], "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "rope_parameters": rope, "num_key_value_heads": cfg.num_attention_heads, "attention_bias": False,
    }
    for f in fields(ModelConfig):
        if f.name not in ("architecture", "path", "rope_scaling", "rope_theta", "init_seed", "init_std"):
            hf[f.name] = getattr(cfg, f.name)
    if not v3:
        hf.pop("rope_interleave")
        if cfg.topk_method == "greedy":
            hf["n_group"] = hf["topk_group"] = None
    return hf
