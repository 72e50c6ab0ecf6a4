"""Turns RuntimeConfig strings into torch objects, once, at start-up."""

from __future__ import annotations

import torch

from moe_pd.config.errors import ConfigError
from moe_pd.config.runtime import RuntimeConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device='cuda': no CUDA device is visible; use runtime.device=cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: RuntimeConfig) -> torch.dtype:
    return _DTYPES[cfg.dtype]
