"""How the benchmarks start their multi-rank parts: torchrun on localhost, one thread per rank."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def torchrun(nproc: int, target: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs `target` (['script.py', args...] or ['-m', 'module', args...]) on `nproc` local ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def worker_or_args(parser: argparse.ArgumentParser, worker) -> argparse.Namespace | None:
    """A benchmark re-runs itself under torchrun with --worker: then this runs `worker(args)` and returns
    None; in the driver it returns the parsed arguments."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return None
    return args


def run_workers(script: str, ranks: list[int], args: list[str]) -> None:
    """`script --worker args...` on each rank count in turn (rank 0 prints; the ranks' stderr is dropped)."""
    for nproc in ranks:
        torchrun(nproc, [script, "--worker", *args], check=True, stderr=subprocess.DEVNULL)
