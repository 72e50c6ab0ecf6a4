"""Every kernel compiles ahead of time for Hopper (sm_90a) and Blackwell (sm_100a) with no GPU present
(python -m moe_pd.kernels.aot; the GPU suite compiles every config for the device it runs on). The tool runs
in a subprocess without TRITON_INTERPRET, which this test session sets for the interpreter."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _compiler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _python(code: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=_compiler_env())


@pytest.mark.timeout(300)
def test_the_ci_subset_compiles_for_sm90a_and_sm100a_within_limits():
    """One config per kernel variant at DeepSeek-V3's shapes (the grouped GEMM's variants are shape-free:
    bf16, FP8 and fp32, contiguous and masked, with and without SwiGLU)."""
    run = subprocess.run([sys.executable, "-m", "moe_pd.kernels.aot", "--arch", "sm_90a", "--arch", "sm_100a",
                          "--subset", "ci", "--model", "deepseek_v3", "--jobs", "2"],
                         capture_output=True, text=True, timeout=280, env=_compiler_env())
    last = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    compiled, failed = map(int, re.fullmatch(r"(\d+) kernels compiled, (\d+) failed", last).groups())
    assert failed == 0
    rows = [line for line in run.stdout.splitlines() if line.startswith("sm_")]
    assert compiled == len(rows) >= 40
    for kernel in ("grouped_gemm", "fused_gate", "act_quant", "permute", "unpermute", "mla_decode"):
        assert any(f"| {kernel} |" in r for r in rows), kernel
    assert all("| ok |" in r for r in rows)


@pytest.mark.timeout(120)
def test_a_tile_over_shared_memory_is_reported_and_fails_the_run():
    """The bf16 SwiGLU GEMM at 128x128x128 with 3 stages needs ~289 KB of shared memory (two weight tiles per
    stage): the tool must flag it, not call it compiled."""
    code = """
from dataclasses import replace
from moe_pd.kernels import aot
case = next(c for c in aot.cases(("deepseek_v3",), subset=True) if c.variant == "bf16 contiguous swiglu")
big = replace(case, constexprs={**case.constexprs, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128},
              num_warps=8, num_stages=3)
result = aot.compile_case(big, "sm_90a")
print(result.error or "", "|", "; ".join(result.problems), "|", result.shared)
"""
    run = _python(code, 110)
    assert run.returncode == 0, run.stderr[-2000:]
    error, problems, shared = (part.strip() for part in run.stdout.strip().splitlines()[-1].split("|"))
    assert not error
    assert int(shared) > 232448 and "shared" in problems


@pytest.mark.timeout(60)
def test_the_tool_refuses_to_run_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "moe_pd.kernels.aot", "--arch", "sm_90a", "--subset", "ci"],
                         capture_output=True, text=True, timeout=50, env=env)
    assert run.returncode != 0 and "TRITON_INTERPRET" in run.stderr
