"""Dispatcher backends under torchrun/gloo against the local backend and an all-reduce reference MoE."""

from pathlib import Path

import pytest

from helpers.torchrun import torchrun

HERE = Path(__file__).parent


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [2, 4])
def test_backends_match_references(ranks):
    proc = torchrun(ranks, [str(HERE / "dispatch_worker.py")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("all cases match") == ranks
