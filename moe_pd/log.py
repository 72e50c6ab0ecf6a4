"""Rank-aware logging: rank 0 logs at the configured level, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else "WARNING")
