"""Dispatch + combine latency and bytes moved, moe_pd's all_to_all dispatcher vs a naive all_gather exchange.

    python perf/bench_dispatch.py [--ranks 2 4] [--tokens 128 512 1024 4096] [--hidden 1024] [--fp8]
                                  [--backend gloo|nccl]

Runs itself under torchrun for each rank count: gloo on CPU by default, NCCL with --backend nccl (one
GPU per rank). Both sides do
the same job for every rank's tokens (top-k routing over E experts, uniform random): route rows to the
ranks holding their experts and bring the weighted sums back. The baseline all_gathers every token and
its routing to every rank, computes there, and all_reduces the partial outputs. Prints medians and the
ratio baseline/ours (> 1: ours is faster), measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torchrun_launch import run_workers, worker_or_args


def naive_exchange(x_TD, ids_TK, w_TK, local_experts, world):
    """all_gather tokens and routing; each rank applies its experts (identity here) to every token; all_reduce."""
    t = torch.tensor([x_TD.shape[0]], device=x_TD.device)
    sizes = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(sizes, t)
    tmax = int(max(s.item() for s in sizes))
    pad = lambda a: torch.cat([a, a.new_zeros(tmax - a.shape[0], *a.shape[1:])])  # noqa: E731
    xs = [x_TD.new_empty(tmax, x_TD.shape[1]) for _ in range(world)]
    ids = [ids_TK.new_empty(tmax, ids_TK.shape[1]) for _ in range(world)]
    ws = [w_TK.new_empty(tmax, w_TK.shape[1]) for _ in range(world)]
    dist.all_gather(xs, pad(x_TD))
    dist.all_gather(ids, pad(ids_TK))
    dist.all_gather(ws, pad(w_TK))
    lo, hi = local_experts[0], local_experts[-1]
    out = torch.stack([(x[:, None, :] * (w * ((i >= lo) & (i <= hi)))[..., None]).sum(1)
                       for x, i, w in zip(xs, ids, ws)])
    dist.all_reduce(out)
    gathered = (world - 1) * tmax * (x_TD.shape[1] * 4 + 12 * ids_TK.shape[1])
    reduced = 2 * (world - 1) * tmax * x_TD.shape[1] * 4  # ring all_reduce of [R, tmax, D] / R per rank
    return out[dist.get_rank(), : x_TD.shape[0]], gathered + reduced


def worker(args) -> None:
    from moe_pd.parallel.dispatch.all_to_all import AllToAllDispatcher
    from moe_pd.parallel.placement import ExpertPlacement
    from moe_pd.parallel.state import ParallelState, join_process_group

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    join_process_group(args.backend)
    state = ParallelState(rank, world, rank, world, rank, world, rank, args.experts, device, args.backend,
                          dist.group.WORLD)
    placement = ExpertPlacement.contiguous(1, args.experts, 0, world)
    ours = AllToAllDispatcher(state, args.hidden, placement, fp8=args.fp8)
    local = list(range(rank * args.experts // world, (rank + 1) * args.experts // world))
    gen = torch.Generator().manual_seed(rank)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, generator=gen).to(device)
        ids = torch.stack([torch.randperm(args.experts, generator=gen)[: args.topk] for _ in range(tokens)]).to(device)
        w = torch.rand(tokens, args.topk, generator=gen).to(device)
        times = {"ours": [], "naive": []}
        moved = {}
        for it in range(args.iters + 1):
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            dist.barrier()
            t0 = time.perf_counter()
            routed = ours.dispatch(x, ids, w, layer=0)
            ours.combine(routed.x_ND, routed.handle)
            sync()
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            _, moved["naive"] = naive_exchange(x, ids, w, local, world)
            sync()
            t3 = time.perf_counter()
            if it:  # the first iteration warms up
                times["ours"].append(t1 - t0)
                times["naive"].append(t3 - t2)
        row_bytes = args.hidden + 4 * args.hidden // 128 if args.fp8 else args.hidden * 4
        sent = routed.handle.send_split
        # off-rank bytes: dispatch payload + metadata (K slot ids + K weights) + combine partial sums
        moved["ours"] = (sum(sent) - sent[rank]) * (row_bytes + 8 * args.topk + args.hidden * 4)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((tokens, med["ours"], med["naive"], moved["ours"], moved["naive"]))
    if rank == 0:
        for tokens, ours_s, naive_s, ours_b, naive_b in rows:
            print(f"{world:5d} {tokens:7d} {ours_s * 1e3:10.2f} {naive_s * 1e3:10.2f} {naive_s / ours_s:7.2f}x "
                  f"{ours_b / 2**20:10.1f} {naive_b / 2**20:10.1f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--fp8", action="store_true", help="FP8 e4m3 dispatch payload (emulated on CPU)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    args = worker_or_args(parser, worker)
    if args is None:
        return
    print(f"dispatch+combine per rank, {args.backend}, torch {torch.__version__}, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.topk}, fp8 {args.fp8}, median of {args.iters}")
    print(f"{'ranks':>5} {'tokens':>7} {'ours ms':>10} {'naive ms':>10} {'ratio':>8} "
          f"{'ours MiB':>10} {'naive MiB':>10}")
    sys.stdout.flush()
    run_workers(__file__, args.ranks, sys.argv[1:])


if __name__ == "__main__":
    main()
