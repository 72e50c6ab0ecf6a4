"""Dispatcher backends under torchrun/gloo against the local backend and an all-reduce reference MoE."""

import json
from pathlib import Path

import pytest

from helpers.torchrun import torchrun

HERE = Path(__file__).parent
CASES = {"uneven", "one_expert", "zero_tokens", "minus_one", "odd_t"}
REFERENCES = ("local", "all-reduce")
BACKENDS = {f"{kind} fp8={fp8}" for fp8 in (False, True) for kind in ("all_to_all", "all_to_all padded")}
DEEPEP = {f"{api} {mode} fp8={fp8}" for fp8 in (False, True) for api in ("v1", "v2")
          for mode in ("normal", "low_latency")}
MISUSE = {"v2 cached handle with topk_idx", "v2 cached handle with a CPU sync", "v2 more tokens than the buffer",
          "v2 combine of other rows", "v2 bf16 weights", "v1 third low-latency call over a pending hook",
          "v1 low-latency weights in bf16"}


def assert_outputs_match(results, backends, rank, ranks):
    # every backend, every case, against both references
    assert {(r["backend"], r["case"], r["reference"]) for r in results} == {
        (b, c, ref) for b in backends for c in CASES for ref in REFERENCES}
    bad = [r for r in results if not (r["shape_matches"] and r["close"])]
    assert bad == [], bad
    assert max(r["max_abs_err"] for r in results) < 1e-4
    assert any(r["tokens"] == 0 for r in results) == (rank == ranks - 1)  # the zero-token case ran


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [2, 4])
def test_backends_match_references(ranks, tmp_path):
    proc = torchrun(ranks, [str(HERE / "dispatch_worker.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(ranks):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert_outputs_match(report["results"], BACKENDS, rank, ranks)


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [2, 4])
def test_deepep_adapters_against_their_doubles(ranks, tmp_path):
    """V1 Buffer and V2 ElasticBuffer adapters: MoE outputs, receive hooks, refused misuse, overlap schedules."""
    proc = torchrun(ranks, [str(HERE / "deepep_worker.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(ranks):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert_outputs_match(report["moe"], DEEPEP, rank, ranks)
        hooks = report["hooks"]  # V1 low latency: only the send half runs in *_start, the receive in *_wait
        assert hooks["dispatch_start"] == ["low_latency_dispatch.send"]
        assert hooks["dispatch_wait"][-1] == "low_latency_dispatch.recv"
        assert hooks["combine_start"][-1] == "low_latency_combine.send"
        assert hooks["combine_wait"][-1] == "low_latency_combine.recv"
        assert report["misuse_refused"] == dict.fromkeys(MISUSE, True)
        # the overlapped forward (two micro-batches) equals the plain one on both adapters, both schedules
        errors = {(e["adapter"], e["schedule"]): e["rel_err"] for e in report["schedules"]}
        assert set(errors) == {(a, s) for a in ("v1 auto", "v2 auto") for s in ("prefill", "decode")}
        assert max(errors.values()) <= 1e-5, errors
        assert report["group_freed"], "the process group outlived shutdown"
