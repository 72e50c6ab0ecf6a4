"""EPLB placement quality and planning time, DeepSeek's policy vs ours, plus a live rebalance on CPU.

    python perf/bench_eplb.py [--skip-live]

1. Zipf-skewed loads with DeepSeek-V3 shapes (58 MoE layers, 256 experts, 32 redundant slots) at EP 32 on
   4 nodes (hierarchical policy) and EP 144 on 18 nodes (global policy): balancedness (mean / max GPU
   load; 1 is perfect) with no replication, DeepSeek's policy and ours, and both planning times.
2. Recorded loads: DeepSeek-V3's router (sigmoid, correction bias, 8 groups, top-4 groups, top-8) on
   random hidden states with a per-layer skewed bias, counted by moe_pd's load recorder, same comparison.
3. Live: the tiny model, 4 ranks on gloo, a gate bias that sends most tokens to rank 0's experts, online
   rebalancing: the most loaded rank's received rows per window before and after the switch.
All ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
from torchrun_launch import torchrun

from moe_pd.eplb.recorder import ExpertLoadRecorder
from moe_pd.eplb.replay import compare
from moe_pd.model.gate import gate_scores, select_experts

LAYERS, EXPERTS, REDUNDANT, GROUPS = 58, 256, 32, 8
CASES = ((32, 4), (144, 18))


def zipf_loads(skew: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, EXPERTS + 1).float()
    return torch.stack([(1e6 / ranks**skew)[torch.randperm(EXPERTS, generator=gen)] for _ in range(LAYERS)]).round()


def recorded_loads(tokens: int = 4096, hidden: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    recorder = ExpertLoadRecorder(LAYERS, EXPERTS, window=1)
    recorder.begin_step()
    for layer in range(LAYERS):
        x = torch.randn(tokens, hidden, generator=gen)
        gate = torch.randn(EXPERTS, hidden, generator=gen) / hidden**0.5
        bias = 0.3 * torch.randn(EXPERTS, generator=gen).clamp(min=0) ** 2  # a few hot experts per layer
        scores = gate_scores(x @ gate.t(), "sigmoid")
        recorder.record(layer, select_experts(scores, 8, "noaux_tc", GROUPS, 4, bias))
    return recorder.window_load()


def report(title: str, weight: torch.Tensor) -> list[tuple]:
    rows = []
    for gpus, nodes in CASES:
        r = compare(weight, gpus, REDUNDANT, nodes, GROUPS)
        rows.append((title, gpus, nodes, r["none"].mean().item(), r["deepseek"].mean().item(), r["ours"].mean().item(),
                     r["deepseek_s"], r["ours_s"], bool((r["ours"] >= r["deepseek"] - 1e-6).all())))
    return rows


def live_rebalance() -> tuple[tuple[int, float], tuple[int, float]] | None:
    """Returns ((max, mean) rows per rank in the window before the first switch, (max, mean) in the last
    window), or None on failure."""
    from hydra import compose, initialize_config_module

    from moe_pd.config.store import register_configs, to_config
    from moe_pd.model.loader import build_model, save_checkpoint

    register_configs()
    with initialize_config_module("moe_pd.conf", version_base=None):
        tiny = to_config(compose("generate")).model
    model = build_model(tiny)
    for layer in model.model.layers[tiny.first_k_dense_replace:]:
        layer.mlp.gate.e_score_correction_bias[:4] += 1.0  # experts 0-3 (rank 0's) win most routings
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, Path(tmp) / "skewed")
        prompts = ",".join(str([256, *f"prompt number {i} about load balancing".encode()]) for i in range(16))
        cmd = ["-m", "moe_pd.generate", "model=path", f"model.path={Path(tmp) / 'skewed'}", f"prompt_ids=[{prompts}]",
               "sampling.max_new_tokens=24", "sampling.ignore_eos=true", "parallel.num_redundant_experts=16",
               "eplb=online", "eplb.rebalance_every=6", "eplb.window_steps=6", "eplb.min_gain=0.01",
               "max_batch_size=4", f"hydra.run.dir={tmp}/run"]
        proc = torchrun(4, cmd, capture_output=True, text=True, timeout=600)
    rows = [(int(a), float(b)) for a, b in re.findall(r"window rows per rank max (\d+), mean ([\d.]+)", proc.stderr)]
    switched = [m.start() for m in re.finditer("switched placement", proc.stderr)]
    if proc.returncode != 0 or len(rows) < 2 or not switched:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return rows[0], rows[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-live", action="store_true", help="skip the 4-rank tiny-model run")
    args = parser.parse_args()
    rows = []
    for skew in (0.8, 1.0, 1.2):
        rows += report(f"zipf s={skew}", zipf_loads(skew))
    rows += report("recorded (V3 router)", recorded_loads())
    print(f"DeepSeek-V3 shapes: {LAYERS} MoE layers, {EXPERTS} experts, {REDUNDANT} redundant, {GROUPS} groups")
    print(f"{'loads':22} {'EP':>4} {'nodes':>5} {'none':>7} {'deepseek':>9} {'ours':>7} {'ours/ds':>8} "
          f"{'ds plan s':>9} {'ours plan s':>11} {'never worse':>11}")
    for title, gpus, nodes, none, ds, ours, ds_s, ours_s, ok in rows:
        print(f"{title:22} {gpus:4d} {nodes:5d} {none:7.4f} {ds:9.4f} {ours:7.4f} {ours / ds:7.4f}x "
              f"{ds_s:9.3f} {ours_s:11.3f} {str(ok):>11}")
    mean_gain = sum(r[5] / r[4] for r in rows) / len(rows)
    print(f"ours / deepseek balancedness, mean over cases: {mean_gain:.4f}x")
    if not args.skip_live:
        live = live_rebalance()
        if live is None:
            print("live rebalance: failed (see stderr)")
        else:
            (b_max, b_mean), (a_max, a_mean) = live
            print(f"live rebalance (tiny model, 4 ranks, skewed gate, 6-step windows): most loaded rank's rows / mean "
                  f"rank's rows = {b_max}/{b_mean:.0f} = {b_max / b_mean:.2f} before the switch, "
                  f"{a_max}/{a_mean:.0f} = {a_max / a_mean:.2f} after")


if __name__ == "__main__":
    main()
