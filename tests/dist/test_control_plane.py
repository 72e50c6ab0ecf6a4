"""The instances' per-iteration control exchange (ControlPlane) under torchrun."""

from pathlib import Path

import pytest

from helpers.torchrun import torchrun


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_every_rank_gets_every_payload_including_oversized_ones():
    proc = torchrun(3, [str(Path(__file__).parent / "control_worker.py")], timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("control plane ok") == 3
