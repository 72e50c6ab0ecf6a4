"""The instances' per-iteration control exchange: ControlPlane (one all_gather of fixed-size byte buffers)
against torch's all_gather_object (two collectives: the sizes, then the data), in the same run.

    python perf/bench_control.py [--ranks 2 4] [--requests 1 16 64] [--iters 300]

Runs itself under torchrun (gloo, CPU) for each rank count. Each rank's payload is what a decode rank sends
every iteration while generating: one token event per running request (--requests per rank) and its load
report. Prints the median time per exchange of each and the ratio all_gather_object / ControlPlane
(> 1: ControlPlane is faster); both are timed alternately in the same loop.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time

import torch
from torchrun_launch import run_workers, worker_or_args


def payload(rank: int, requests: int) -> dict:
    """A decode rank's iteration message: one token event per running request, and its load."""
    events = [{"op": "tokens", "rid": f"cmpl-{rank:04x}{i:012x}.0", "ids": [1234], "finished": False,
               "reason": None} for i in range(requests)]
    load = {"rank": rank, "kv_used": 1000, "kv_total": 4096, "running": requests, "waiting": 0,
            "queued_tokens": 0, "max_running": 64, "address": "tcp://10.0.0.1:40000", "in_transfer": 0,
            "cached_tokens": 0, "aborted": 0, "pid": 1, "transfers": {}}
    return {"commands": None, "events": events, "load": load, "busy": True, "stop": False}


def worker(args) -> None:
    import torch.distributed as dist

    from moe_pd.parallel.state import join_process_group
    from moe_pd.serve.service import ControlPlane

    join_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plane = ControlPlane(world, "gloo")
    for requests in args.requests:
        message = payload(rank, requests)

        def gather_object():
            out = [None] * world
            dist.all_gather_object(out, message)
            return out

        times: dict[str, list[float]] = {"object": [], "plane": []}
        for i in range(args.iters + 20):  # the first 20 warm up (and grow the plane's buffer)
            for name, exchange in (("object", gather_object), ("plane", lambda: plane.exchange(message))):
                dist.barrier()
                start = time.perf_counter()
                got = exchange()
                if i >= 20:
                    times[name].append(time.perf_counter() - start)
            assert got == [payload(r, requests) for r in range(world)]
        medians = torch.tensor([statistics.median(times["object"]), statistics.median(times["plane"])])
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank's median
        if rank == 0:
            obj, plane_s = medians.tolist()
            print(f"{world:>5} {requests:>9} {len(pickle.dumps(message)):>9} {obj * 1e3:>14.3f} "
                  f"{plane_s * 1e3:>14.3f} {obj / plane_s:>7.2f}x", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 16, 64], help="running requests per rank")
    parser.add_argument("--iters", type=int, default=300)
    args = worker_or_args(parser, worker)
    if args is None:
        return
    print(f"control exchange per iteration, gloo, torch {torch.__version__}, median of {args.iters}")
    print(f"{'ranks':>5} {'requests':>9} {'bytes':>9} {'object ms':>14} {'plane ms':>14} {'ratio':>8}")
    sys.stdout.flush()
    run_workers(__file__, args.ranks, sys.argv[1:])


if __name__ == "__main__":
    main()
