"""The instances' per-iteration control exchange (ControlPlane) under torchrun."""

import json
from pathlib import Path

import pytest

from helpers.torchrun import torchrun

HERE = Path(__file__).parent


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_every_rank_gets_every_payload_including_oversized_ones(tmp_path):
    import sys

    sys.path.insert(0, str(HERE))
    from control_worker import CAPACITY, STEPS, payload

    proc = torchrun(3, [str(HERE / "control_worker.py"), str(tmp_path)], timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [r["rank"] for r in reports] == [0, 1, 2]
    for report in reports:
        for step, got in enumerate(report["received"]):
            # every rank's payload, in rank order, byte for byte (the oversized one at step 2 too)
            assert got == [[r, step, len(payload(r, step)["events"]), True] for r in range(3)]
        # the buffer grew once, at the oversized step, to the same power of two on every rank, and stayed
        capacity = report["capacity"]
        assert capacity[:2] == [CAPACITY, CAPACITY] and capacity[2] > CAPACITY and len(set(capacity[2:])) == 1
        assert capacity[2] & (capacity[2] - 1) == 0
    assert len({tuple(r["capacity"]) for r in reports}) == 1
    assert STEPS == len(reports[0]["received"])
