"""Launches a module or script under torchrun on localhost (gloo), with a hard timeout."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun(nproc: int, target: list[str], timeout: float = 180,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`target` is ['-m', 'module', args...] or ['script.py', args...]. Returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
