"""EPLB when the load moves: plan on the windows up to t, score on window t+1, DeepSeek's greedy on the last
window as the baseline in the same run; plus a live rebalance of the tiny model on 4 CPU ranks.

    python perf/bench_eplb.py [--layers 58] [--scored 16] [--skip-live] [--png perf/results/eplb_temporal.png]

Loads: DeepSeek-V3 shapes (58 MoE layers, 256 experts in 8 groups, 32 redundant slots), EP 32 on 4 nodes
(hierarchical policy) and EP 144 on 18 nodes (global policy), windows from the drift generator in
moe_pd/eplb/drift.py (Zipf base popularity, per-window log-normal drift, optional reversion, bursts and
group co-variation; CASES below lists each case's parameters). Every plan sees the last HISTORY windows.

Columns (balancedness = mean / max GPU load, 1 is perfect; next = scored on the window after the plan):
- ds in: DeepSeek's greedy on window t, scored on window t (what a static benchmark reports);
- ds: DeepSeek's greedy on window t, scored on t+1 (the baseline);
- ours: rebalance_experts(policy="ours") on the history, with the previous plan as `current` (hysteresis and
  move cost below), scored on t+1;
- +route: the same placements with run-time replica routing (moe_pd/eplb/replica_routing.py) on t+1's counts;
- ideal: DeepSeek's greedy replanned on t+1 itself (with routing for the +route ideal);
- p10: the 10th percentile over layers of the per-layer mean;
- every k: time-averaged balancedness when replanning only every k windows;
- moved: expert weights moved per rebalance (slots whose expert is not already on that GPU) at DeepSeek-V3's
  FP8 expert size.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchrun_launch import torchrun

from moe_pd.eplb import rebalance_experts
from moe_pd.eplb.drift import DriftSpec, drift_windows
from moe_pd.eplb.metrics import balancedness, gpu_loads
from moe_pd.eplb.recorder import load_stats
from moe_pd.eplb.replay import moved_slots
from moe_pd.eplb.replica_routing import ReplicaRouter, gpu_loads_routed
from moe_pd.parallel.placement import ExpertPlacement

EXPERTS, REDUNDANT, GROUPS, HISTORY = 256, 32, 8, 8
EP_CASES = ((32, 4), (144, 18))
ZIPF = 0.6
CASES = (
    DriftSpec("walk s=0.1", zipf=ZIPF, sigma=0.1),
    DriftSpec("walk s=0.2", zipf=ZIPF, sigma=0.2),
    DriftSpec("walk s=0.3", zipf=ZIPF, sigma=0.3),
    DriftSpec("revert s=0.3 r=0.5", zipf=ZIPF, sigma=0.3, reversion=0.5),
    DriftSpec("bursts s=0.2 x8", zipf=ZIPF, sigma=0.2, burst_rate=0.1, burst_gain=8.0, burst_windows=3),
    DriftSpec("groups s=0.1 g=0.2", zipf=ZIPF, sigma=0.1, group_sigma=0.2),
)
EXPERT_BYTES = 3 * 7168 * 2048 + 3 * (7168 // 128) * (2048 // 128) * 4  # FP8 blocks + fp32 block scales
INTERVALS = (1, 4)
MIN_GAIN, MOVE_COST = 0.0, 0.02
"""ours replans a layer only if its expected balancedness gain exceeds MIN_GAIN + MOVE_COST x (fraction of the
layer's slots fetched): moving every slot of a layer must buy 2 points of balancedness."""


def score(load_LE: torch.Tensor, plan, gpus: int, routed: bool) -> torch.Tensor:
    phy2log, log2phy, logcnt = plan
    loads = gpu_loads_routed(load_LE, phy2log, log2phy, gpus) if routed else gpu_loads(load_LE, phy2log, logcnt, gpus)
    return balancedness(loads)  # [L]


def run_case(spec: DriftSpec, gpus: int, nodes: int, layers: int, scored: int, seed: int = 1) -> dict:
    return run_windows(drift_windows(spec, HISTORY + scored, layers, EXPERTS, seed).float(), gpus, nodes)


def run_windows(windows: torch.Tensor, gpus: int, nodes: int, groups: int = GROUPS, redundant: int = REDUNDANT,
                history: int = HISTORY) -> dict:
    """Scores windows[history:] (each planned on the `history` windows before it) for both policies."""
    scored = windows.shape[0] - history
    replicas = windows.shape[-1] + redundant
    per = {k: [] for k in ("ds_in", "ds", "ours", "ds+route", "ours+route", "ideal", "ideal+route")}
    plans = {"ds": [], "ours": []}
    plan_s = []
    for t in range(history - 1, history + scored - 1):
        nxt = windows[t + 1]
        ds = rebalance_experts(windows[t], replicas, groups, nodes, gpus, policy="deepseek")
        t0 = time.perf_counter()
        current = plans["ours"][-1][0] if plans["ours"] else None
        ours = rebalance_experts(windows[max(t + 1 - HISTORY, 0):t + 1], replicas, groups, nodes, gpus, policy="ours",
                                 current=current, min_gain=MIN_GAIN, move_cost=MOVE_COST)
        plan_s.append(time.perf_counter() - t0)
        ideal = rebalance_experts(nxt, replicas, groups, nodes, gpus, policy="deepseek")
        plans["ds"].append(ds)
        plans["ours"].append(ours)
        per["ds_in"].append(score(windows[t], ds, gpus, False))
        for name, plan in (("ds", ds), ("ours", ours), ("ideal", ideal)):
            per[name].append(score(nxt, plan, gpus, False))
            per[name + "+route"].append(score(nxt, plan, gpus, True))
    out = {name: torch.stack(v).mean(0) for name, v in per.items()}  # per-layer mean over windows: [L]
    for k in INTERVALS:  # replan every k windows; plan i serves windows i+1 .. i+k
        for name in ("ds", "ours"):
            for routed in (False, True):
                vals = [score(windows[history + i], plans[name][i - i % k], gpus, routed).mean()
                        for i in range(scored)]
                out[f"{name}{'+route' if routed else ''} every {k}"] = torch.stack(vals).mean()
    for name in ("ds", "ours"):
        moves = [moved_slots(a[0], b[0], gpus) for a, b in zip(plans[name], plans[name][1:])]
        out[f"{name} moved GB"] = float(np.mean(moves)) * EXPERT_BYTES / 1e9
    out["plan_s"] = float(np.mean(plan_s))
    return out


def table(results: list[tuple[str, int, int, dict]]) -> None:
    print(f"DeepSeek-V3 shapes: {EXPERTS} experts, {REDUNDANT} redundant, {GROUPS} groups; history {HISTORY} windows")
    print("next-window balancedness, mean over layers (p10 over layers)")
    head = ["case", "EP", "ds in", "ds", "ours", "ours/ds", "ds+route", "ours+route", "+route/ds", "ideal",
            "ideal+route"]
    print(" | ".join(head))
    for name, gpus, _, r in results:
        cells = [name, str(gpus), f"{r['ds_in'].mean():.4f}"]
        for key in ("ds", "ours"):
            cells.append(f"{r[key].mean():.4f} ({r[key].quantile(0.1):.3f})")
        cells.append(f"{r['ours'].mean() / r['ds'].mean():.4f}x")
        for key in ("ds+route", "ours+route"):
            cells.append(f"{r[key].mean():.4f} ({r[key].quantile(0.1):.3f})")
        cells.append(f"{r['ours+route'].mean() / r['ds'].mean():.4f}x")
        cells += [f"{r['ideal'].mean():.4f}", f"{r['ideal+route'].mean():.4f}"]
        print(" | ".join(cells))
    print("\ntime-averaged balancedness when replanning every k windows; weights moved per rebalance; plan time")
    cols = [f"{n} every {k}" for k in INTERVALS for n in ("ds", "ours", "ours+route")]
    print(" | ".join(["case", "EP", *cols, "ds moved GB", "ours moved GB", "ours plan s"]))
    for name, gpus, _, r in results:
        print(" | ".join([name, str(gpus), *(f"{float(r[c]):.4f}" for c in cols), f"{r['ds moved GB']:.1f}",
                          f"{r['ours moved GB']:.1f}", f"{r['plan_s']:.3f}"]))
    for gpus, _ in EP_CASES:
        rows = [r for _, g, _, r in results if g == gpus]
        plan = [float(r["ours"].mean() / r["ds"].mean()) for r in rows]
        route = [float(r["ours+route"].mean() / r["ds"].mean()) for r in rows]
        print(f"EP {gpus}: ours / ds mean {np.mean(plan):.4f}x (worst {min(plan):.4f}x); ours+route / ds mean "
              f"{np.mean(route):.4f}x (worst {min(route):.4f}x)")


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("ds", "ours", "ds+route", "ours+route", "ideal")
    fig, axes = plt.subplots(1, len(EP_CASES), figsize=(14, 4.5), sharey=True)
    for ax, (gpus, nodes) in zip(axes, EP_CASES):
        rows = [(n, r) for n, g, _, r in results if g == gpus]
        x = np.arange(len(rows))
        for i, key in enumerate(keys):
            ax.bar(x + (i - 2) * 0.16, [float(r[key].mean()) for _, r in rows], 0.16, label=key)
        ax.set_xticks(x, [n for n, _ in rows], rotation=25, ha="right", fontsize=8)
        ax.set_title(f"EP {gpus} on {nodes} nodes: balancedness on the next window")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean / max GPU load")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def routing_cost(repeats: int = 20) -> None:
    """CPU time of ReplicaRouter.route per MoE layer (one process: no all_reduce) against the static map."""
    windows = drift_windows(CASES[1], 1, 1, EXPERTS, seed=0).float()
    print("\nrun-time replica routing cost per MoE layer on this CPU (one rank, no all_reduce), median of "
          f"{repeats}: tokens on the rank x top-8")
    for gpus, nodes in EP_CASES:
        plan = rebalance_experts(windows[0], EXPERTS + REDUNDANT, GROUPS, nodes, gpus, policy="deepseek")
        placement = ExpertPlacement.from_phy2log(plan[0], EXPERTS, gpus)
        router = ReplicaRouter()
        probs = windows[0, 0] / windows[0, 0].sum()
        for tokens in (128, 4096):
            ids = torch.multinomial(probs, tokens * 8, replacement=True, generator=torch.Generator().manual_seed(0))
            ids = ids.view(tokens, 8)
            times = {}
            for name, fn in (("static", lambda: placement.route(ids, 0)),
                             ("balanced", lambda: router.route(ids, placement, 0))):
                fn()
                samples = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - t0)
                times[name] = float(np.median(samples)) * 1e3
            print(f"EP {gpus}, {tokens} tokens: static {times['static']:.3f} ms, balanced {times['balanced']:.3f} ms")


def _tiny_run(tmp: str, skew: bool, extra: list[str]) -> tuple[subprocess.CompletedProcess, torch.Tensor | None]:
    """moe_pd.generate on 4 ranks with the tiny model (experts 0-3, rank 0's, favoured by the gate with
    `skew`), online EPLB on 3-step windows; returns the process and the load windows it recorded."""
    from hydra import compose, initialize_config_module

    from moe_pd.config.store import register_configs, to_config
    from moe_pd.model.loader import build_model, save_checkpoint

    register_configs()
    with initialize_config_module("moe_pd.conf", version_base=None):
        tiny = to_config(compose("generate")).model
    model = build_model(tiny)
    if skew:
        for layer in model.model.layers[tiny.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias[:4] += 1.0
    save_checkpoint(model, Path(tmp) / "ckpt")
    prompts = ",".join(str([256, *f"prompt number {i} about load balancing".encode()]) for i in range(16))
    cmd = ["-m", "moe_pd.generate", "model=path", f"model.path={Path(tmp) / 'ckpt'}", f"prompt_ids=[{prompts}]",
           "sampling.ignore_eos=true", "parallel.num_redundant_experts=16", "eplb=online", "eplb.rebalance_every=3",
           "eplb.window_steps=3", "eplb.history_windows=64", f"eplb.dump_stats={tmp}/stats.safetensors",
           "max_batch_size=4", f"hydra.run.dir={tmp}/run", *extra]
    proc = torchrun(4, cmd, capture_output=True, text=True, timeout=600)
    history = load_stats(f"{tmp}/stats.safetensors").load_history_TLE if proc.returncode == 0 else None
    return proc, history


def live_rebalance() -> tuple[tuple[int, float], tuple[int, float]] | None:
    """The skewed tiny model with online rebalancing: ((max, mean) rows per rank in the window before the
    first switch, (max, mean) in the last window)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, _ = _tiny_run(tmp, True, ["sampling.max_new_tokens=24", "eplb.min_gain=0.01"])
    rows = [(int(a), float(b)) for a, b in re.findall(r"window rows per rank max (\d+), mean ([\d.]+)", proc.stderr)]
    if proc.returncode != 0 or len(rows) < 2 or "switched placement" not in proc.stderr:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return rows[0], rows[-1]


def recorded_windows() -> torch.Tensor | None:
    """Load windows [T, L, E] the recorder kept in a run of the unskewed tiny model (random weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, history = _tiny_run(tmp, False, ["sampling.max_new_tokens=64"])
    if history is None:
        print(proc.stderr[-2000:], file=sys.stderr)
    return None if history is None else history.float()


def trained_windows() -> torch.Tensor:
    """Load windows [T, L, E] of the trained tiny checkpoint (moe_pd/assets/tiny_dsv3: 24 windows of a workload
    whose kind of document changes every 4 windows, its 3 MoE layers and the MTP layer x 16 experts), as its
    training recorded them (docs/tiny_checkpoint.md)."""
    from safetensors.torch import load_file

    from moe_pd.assets import TINY_DSV3

    return load_file(str(Path(TINY_DSV3) / "expert_load.safetensors"))["expert_load_history"].float()


def print_windows(what: str, windows: torch.Tensor) -> None:
    r = run_windows(windows, 4, 1, groups=4, redundant=16, history=1)
    print(f"{what}: {windows.shape[0]} windows, {windows.shape[1]} MoE layers x {windows.shape[2]} experts, EP 4, "
          f"16 redundant), next-window balancedness: ds {r['ds'].mean():.4f}, ours {r['ours'].mean():.4f}, "
          f"ds+route {r['ds+route'].mean():.4f}, ours+route {r['ours+route'].mean():.4f}, ideal "
          f"{r['ideal'].mean():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--scored", type=int, default=16, help="windows scored per case")
    parser.add_argument("--png", default="perf/results/eplb_temporal.png")
    parser.add_argument("--skip-live", action="store_true", help="skip the 4-rank tiny-model run")
    parser.add_argument("--trained-only", action="store_true",
                        help="only the trained checkpoint's recorded windows (seconds)")
    args = parser.parse_args()
    if args.trained_only:
        print_windows("trained router's windows (moe_pd/assets/tiny_dsv3, a shifting mix of documents",
                      trained_windows())
        return
    for spec in CASES:
        print(spec)
    results = []
    for gpus, nodes in EP_CASES:
        for spec in CASES:
            results.append((spec.name, gpus, nodes, run_case(spec, gpus, nodes, args.layers, args.scored)))
    table(results)
    if args.png:
        plot(results, args.png)
    routing_cost()
    if not args.skip_live:
        live = live_rebalance()
        if live is None:
            print("live rebalance: failed (see stderr)")
        else:
            (b_max, b_mean), (a_max, a_mean) = live
            print(f"\nlive rebalance (tiny model, 4 ranks, skewed gate, 3-step windows): most loaded rank's rows / "
                  f"mean rank's rows = {b_max}/{b_mean:.0f} = {b_max / b_mean:.2f} before the first switch, "
                  f"{a_max}/{a_mean:.0f} = {a_max / a_mean:.2f} in the last window")
        recorded = recorded_windows()
        if recorded is not None:
            print_windows("recorded windows (the recorder in a 4-rank run of the tiny model, random weights, no "
                          "skew, windows of 3 steps", recorded)
    print_windows("trained router's windows (moe_pd/assets/tiny_dsv3, a shifting mix of documents", trained_windows())


if __name__ == "__main__":
    main()
