"""Two-micro-batch overlap under torchrun: same outputs as the plain forward, same tokens, labelled traces."""

import gzip
import json
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
def test_overlapped_forward_matches_plain(ranks):
    proc = torchrun(ranks, [str(HERE / "overlap_worker.py")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("overlap matches") == ranks


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
    assert "communication hidden under compute:" in report.stdout
    with gzip.open(iter_dir / "merged_trace.json.gz", "rt") as f:
        merged = json.load(f)["traceEvents"]
    assert {e["pid"] for e in merged} == {0, 1}
