"""Two-micro-batch overlap under torchrun: same outputs as the plain forward, same tokens, labelled traces."""

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.torchrun import torchrun

HERE = Path(__file__).parent
PROMPTS = '["Hello, moe_pd", "a", "DeepSeek-V3 serves with PD disaggregation", "xyz xyz", "0123456789"]'
COMMON = [f"prompts={PROMPTS}", "sampling.max_new_tokens=10", "sampling.ignore_eos=true", "runtime.log_level=WARNING"]


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_overlapped_forward_matches_plain(ranks, tmp_path):
    proc = torchrun(ranks, [str(HERE / "overlap_worker.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    for report in reports:
        assert set(report["relative_diff"]) == {"prefill", "decode"}
        assert max(report["relative_diff"].values()) <= 1e-6, report
        assert report["group_freed"], "the process group outlived shutdown"
    if ranks > 1:
        assert reports[1]["tokens"] == 0  # a rank with nothing to run (empty micro-batches) took part


def outputs(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["output_ids"] for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.dist
def test_greedy_tokens_identical_with_overlap_on_and_off(tmp_path):
    plain = outputs(subprocess.run([sys.executable, "-m", "moe_pd.generate", *COMMON], capture_output=True,
                                   text=True, timeout=120))
    overlapped = outputs(torchrun(4, ["-m", "moe_pd.generate", *COMMON, "overlap.enabled=true"], timeout=240))
    assert overlapped == plain and len(plain) == 5


@pytest.mark.dist
def test_traces_per_rank_with_both_micro_batches(tmp_path):
    proc = torchrun(2, ["-m", "moe_pd.generate", *COMMON, "overlap.enabled=true", "profile.enabled=true",
                        "profile.wait=1", "profile.warmup=1", "profile.active=2", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    iter_dir = tmp_path / "profile" / "generate" / "iter_4"
    for rank in (0, 1):
        with gzip.open(iter_dir / f"rank{rank}_trace.json.gz", "rt") as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        for label in ("ATTN-0(0)", "ATTN-0(1)", "ATTN-1(1)", "DISPATCH(0)", "DISPATCH-WAIT(1)", "COMBINE-WAIT(0)"):
            assert any(n and n.endswith(label) for n in names), (rank, label)
    report = subprocess.run([sys.executable, "-m", "moe_pd.profiling.report", str(tmp_path / "profile" / "generate")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    # the hidden fraction it prints is the one the traces give, and a real fraction of every layer's traffic
    from moe_pd.profiling.report import analyse, hidden_fraction, load_events

    stats = analyse({r: load_events(iter_dir / f"rank{r}_trace.json.gz") for r in (0, 1)})
    printed = float(re.search(r"communication hidden under compute: ([0-9.]+)%", report.stdout).group(1)) / 100
    assert printed == pytest.approx(hidden_fraction(stats["comm"]), abs=5e-4)
    assert 0.0 < printed < 1.0
    assert stats["micro_batches"] == ["0", "1"]
    moe_layers = {layer for layer, ops in stats["comm"].items() if ops}
    assert moe_layers and all(ops["DISPATCH"][0] > 0 and ops["COMBINE"][0] > 0 for ops in stats["comm"].values())
    for layer in moe_layers:  # per layer: blocked time never exceeds time in flight
        for in_flight, blocked, count in stats["comm"][layer].values():
            assert 0 <= blocked <= in_flight and count > 0
    with gzip.open(iter_dir / "merged_trace.json.gz", "rt") as f:
        merged = json.load(f)["traceEvents"]
    assert {e["pid"] for e in merged} == {0, 1}
