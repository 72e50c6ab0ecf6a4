"""Turns RuntimeConfig strings (and dtype names on the wire) into torch objects."""

from __future__ import annotations

import torch

from moe_pd.config.errors import ConfigError
from moe_pd.config.runtime import RuntimeConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The activation dtypes by name (runtime.dtype, KV transfer headers)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device='cuda': no CUDA device is visible; use runtime.device=cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: RuntimeConfig) -> torch.dtype:
    return dtype_from_name(cfg.dtype)
