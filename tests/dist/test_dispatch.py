"""Dispatcher backends under torchrun/gloo against the local backend and an all-reduce reference MoE."""

import json
from pathlib import Path

import pytest

from helpers.torchrun import torchrun

HERE = Path(__file__).parent
CASES = {"uneven", "one_expert", "zero_tokens", "minus_one", "odd_t"}
BACKENDS = {f"{kind} fp8={fp8}" for fp8 in (False, True)
            for kind in ("all_to_all", "all_to_all padded", "deepep-double normal", "deepep-double low_latency")}


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [2, 4])
def test_backends_match_references(ranks, tmp_path):
    proc = torchrun(ranks, [str(HERE / "dispatch_worker.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(ranks):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        results = report["results"]
        # every backend, every case, against both references
        assert {(r["backend"], r["case"], r["reference"]) for r in results} == {
            (b, c, ref) for b in BACKENDS for c in CASES for ref in ("local", "all-reduce")}
        bad = [r for r in results if not (r["shape_matches"] and r["close"])]
        assert bad == [], bad
        assert max(r["max_abs_err"] for r in results) < 1e-4
        assert any(r["tokens"] == 0 for r in results) == (rank == ranks - 1)  # the zero-token case ran
        hooks = report["hooks"]  # low latency: only the send half runs in *_start, the receive in *_wait
        assert hooks["dispatch_start"] == ["low_latency_dispatch.send"]
        assert hooks["dispatch_wait"][-1] == "low_latency_dispatch.recv"
        assert hooks["combine_start"][-1] == "low_latency_combine.send"
        assert hooks["combine_wait"][-1] == "low_latency_combine.recv"
