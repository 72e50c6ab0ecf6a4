"""Replays recorded expert load through the placement policies.

    python -m moe_pd.eplb.replay STATS --num-gpus 32 --num-redundant 32 [--num-nodes 4] [--num-groups 8]
                                       [--expert-bytes N] [--per-layer]

STATS is a file written by `eplb.dump_stats` (safetensors `expert_load` [MoE layers, experts] + JSON
metadata). Prints balancedness (mean / max load per GPU; 1 is perfect) per layer and overall for: no
replication (experts laid out contiguously), DeepSeek's policy, and ours; their planning times; and the
bytes of expert weights a rebalance from the default placement to ours would move.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moe_pd.eplb import rebalance_experts
from moe_pd.eplb.metrics import balancedness, gpu_loads, no_replication_loads
from moe_pd.eplb.recorder import load_stats
from moe_pd.parallel.placement import ExpertPlacement


def moved_slots(old_LP: torch.Tensor, new_LP: torch.Tensor, num_gpus: int) -> int:
    """Slots whose expert is not already on the same GPU before the move (those need a transfer)."""
    layers, slots = new_LP.shape
    per_gpu = slots // num_gpus
    moved = 0
    for layer in range(layers):
        old = old_LP[layer].view(num_gpus, per_gpu)
        new = new_LP[layer].view(num_gpus, per_gpu)
        for g in range(num_gpus):
            have = set(old[g].tolist())
            moved += sum(1 for e in new[g].tolist() if e not in have)
    return moved


def compare(weight_LE: torch.Tensor, num_gpus: int, num_redundant: int, num_nodes: int, num_groups: int) -> dict:
    replicas = weight_LE.shape[1] + num_redundant
    out = {"none": balancedness(no_replication_loads(weight_LE, num_gpus))}
    for policy in ("deepseek", "ours"):
        t0 = time.perf_counter()
        phy2log, _, logcnt = rebalance_experts(weight_LE, replicas, num_groups, num_nodes, num_gpus, policy=policy)
        out[f"{policy}_s"] = time.perf_counter() - t0
        out[policy] = balancedness(gpu_loads(weight_LE, phy2log, logcnt, num_gpus))
        out[f"{policy}_phy2log"] = phy2log
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stats")
    parser.add_argument("--num-gpus", type=int, required=True)
    parser.add_argument("--num-redundant", type=int, required=True)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--num-groups", type=int, default=None, help="expert groups (default: from the stats)")
    parser.add_argument("--expert-bytes", type=int, default=None,
                        help="bytes of one expert's weights (default: 3 * hidden * moe_intermediate * 2, bf16)")
    parser.add_argument("--per-layer", action="store_true", help="print every layer, not only the summary")
    args = parser.parse_args(argv)
    try:
        stats = load_stats(args.stats)
    except (FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    weight = stats.expert_load_LE.float()
    meta = stats.meta
    groups = args.num_groups or int(meta.get("n_group", 1))
    hidden, inter = int(meta.get("hidden_size", 0)), int(meta.get("moe_intermediate_size", 0))
    expert_bytes = args.expert_bytes or 3 * hidden * inter * 2
    try:
        result = compare(weight, args.num_gpus, args.num_redundant, args.num_nodes, groups)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layers, experts = weight.shape
    print(f"{args.stats}: {layers} MoE layers x {experts} experts ({meta.get('model', '?')}), "
          f"{args.num_gpus} GPUs on {args.num_nodes} nodes, {args.num_redundant} redundant slots, {groups} groups")
    if args.per_layer:
        print(f"{'layer':>5} {'none':>8} {'deepseek':>9} {'ours':>8}")
        for layer in range(layers):
            row = (result["none"][layer], result["deepseek"][layer], result["ours"][layer])
            print(f"{layer:5d} {row[0]:8.4f} {row[1]:9.4f} {row[2]:8.4f}")
    print(f"balancedness (mean over layers): none {result['none'].mean():.4f}, deepseek {result['deepseek'].mean():.4f}"
          f", ours {result['ours'].mean():.4f} (worst layer {result['ours'].min():.4f})")
    print(f"planning time: deepseek {result['deepseek_s']:.3f} s, ours {result['ours_s']:.3f} s")
    default = ExpertPlacement.contiguous(layers, experts, args.num_redundant, args.num_gpus).phy2log_LP
    moves = moved_slots(default, result["ours_phy2log"], args.num_gpus)
    print(f"rebalance from the default placement: {moves} expert slots change, "
          f"{moves * expert_bytes / 2**20:.2f} MiB of weights move ({expert_bytes / 2**10:.1f} KiB per expert)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
