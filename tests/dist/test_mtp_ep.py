"""The MTP layer expert-parallel over two ranks equals the single-process model (mtp_ep_worker.py)."""

from pathlib import Path

import pytest

from helpers.torchrun import torchrun

HERE = Path(__file__).parent


@pytest.mark.dist
def test_mtp_layer_over_two_ep_ranks_matches_one_process():
    proc = torchrun(2, [str(HERE / "mtp_ep_worker.py")], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("MTP logits match") == 2
