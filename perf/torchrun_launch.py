"""How the benchmarks start their multi-rank parts: torchrun on localhost, one thread per rank."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun(nproc: int, target: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs `target` (['script.py', args...] or ['-m', 'module', args...]) on `nproc` local ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)
