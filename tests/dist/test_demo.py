"""The README's main command, `bash launch/demo.sh`, end to end: set-up, the local PD cluster, the client's
answers and metrics, and a clean stop with exit status 0 and no rank left behind."""

import os
import subprocess

import pytest

from helpers.cluster import ROOT
from moe_pd.serve.local_cluster import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(400)]


def test_the_readme_demo_runs_and_stops_cleanly(tmp_path):
    ports = {name: str(free_port()) for name in ("ROUTER_PORT", "PREFILL_PORT", "DECODE_PORT")}
    env = {**os.environ, **ports, "RUN_DIR": str(tmp_path / "demo"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "launch/demo.sh", "runtime.log_level=WARNING"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "cluster ready" in proc.stdout and "(streaming)" in proc.stdout
    assert "Paris" in proc.stdout and "3 + 4 = 7" in proc.stdout  # the trained checkpoint's answers
    assert "requests finished: 3" in proc.stdout and "0 KV pages in use" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"cluster stopped (logs in {tmp_path / 'demo'})")
    left = subprocess.run(["pgrep", "-f", f"port={ports['DECODE_PORT']}"], capture_output=True, text=True)
    assert left.stdout == "", f"ranks still running: {left.stdout}"
