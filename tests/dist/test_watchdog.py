"""A rank that stalls: the job ends in bounded time, non-zero, naming the slow rank; every rank dumps."""

import json
import time
from pathlib import Path

import pytest

from helpers.torchrun import torchrun

HERE = Path(__file__).parent


@pytest.mark.dist
def test_stalled_rank_is_named(tmp_path):
    started = time.monotonic()
    proc = torchrun(4, [str(HERE / "watchdog_worker.py"), "2.0", "1", str(tmp_path)], timeout=90)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 60, elapsed  # the stalled rank sleeps 120 s: the watchdog, not the sleep, ended the job
    assert "slowest rank: 1" in proc.stderr
    assert "layer3" in proc.stderr and "did not finish within 2 s" in proc.stderr
    dumps = {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert sorted(dumps) == [0, 1, 2, 3]  # every rank, the stalled one included, dumped its recorder
    assert all(d["entries"] for d in dumps.values())
