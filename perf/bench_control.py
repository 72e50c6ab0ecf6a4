"""The instances' per-iteration control exchange: ControlPlane (one all_gather of fixed-size byte buffers,
each rank's RankReport encoded with msgspec) against torch's all_gather_object of the same reports (two
collectives: the sizes, then the pickled data), in the same run.

    python perf/bench_control.py [--ranks 2 4] [--requests 1 16 64] [--iters 300]

Runs itself under torchrun (gloo, CPU) for each rank count. Each rank's payload is what a decode rank sends
every iteration while generating (moe_pd.serve.protocol.RankReport): one token event per running request
(--requests per rank) and its load. The ControlPlane side times what the serving loop does: encode, exchange,
decode every rank's report. Prints the median time per exchange of each and the ratio all_gather_object / ControlPlane
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


def payload(rank: int, requests: int):
    """A decode rank's iteration report: one token event per running request, and its load."""
    from moe_pd.serve import protocol as p

    events = [p.Tokens(f"cmpl-{rank:04x}{i:012x}.0", [1234], False, None) for i in range(requests)]
    load = p.RankLoad(rank, 1000, 4096, requests, 0, 0, 64, "tcp://10.0.0.1:40000", 0, 0, 0, 1, {})
    return p.RankReport(rank, load, events, busy=True, stop=False)


def worker(args) -> None:
    import torch.distributed as dist

    from moe_pd.parallel.control_plane import ControlPlane
    from moe_pd.parallel.state import join_process_group
    from moe_pd.serve import protocol as p

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

        def through_plane():
            return [p.decode_report(raw, r) for r, raw in enumerate(plane.exchange(p.encode(message)))]

        for i in range(args.iters + 20):  # the first 20 warm up (and grow the plane's buffer)
            for name, exchange in (("object", gather_object), ("plane", through_plane)):
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
            print(f"{world:>5} {requests:>9} {len(pickle.dumps(message)):>9} {len(p.encode(message)):>9} "
                  f"{obj * 1e3:>14.3f} {plane_s * 1e3:>14.3f} {obj / plane_s:>7.2f}x", flush=True)
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
    print(f"{'ranks':>5} {'requests':>9} {'pickled':>9} {'msgspec':>9} {'object ms':>14} {'plane ms':>14} "
          f"{'ratio':>8}")
    sys.stdout.flush()
    run_workers(__file__, args.ranks, sys.argv[1:])


if __name__ == "__main__":
    main()
