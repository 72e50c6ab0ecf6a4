"""What every kernel module shares: whether Triton runs interpreted, and shape checks."""

from __future__ import annotations

import os

import torch


def interpreted() -> bool:
    """TRITON_INTERPRET=1: kernels run on the CPU through Triton's interpreter (tests, CI). Set it before
    the kernels are defined (tests/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    check(t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        check(t.dtype in dtypes, f"{name}: dtype {t.dtype} not in {dtypes}")


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
