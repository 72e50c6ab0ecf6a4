"""torchrun worker: rank 1 stalls before a dispatch; the others block in it until the watchdog fires."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from moe_pd.parallel.dispatch.all_to_all import AllToAllDispatcher
from moe_pd.parallel.flight_recorder import FlightRecorder
from moe_pd.parallel.state import ParallelState, join_process_group
from moe_pd.parallel.watchdog import Watchdog, default_store


def main() -> int:
    timeout, stall_rank, dump_dir = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    join_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = ParallelState(rank, world, rank, world, rank, world, rank, 8, torch.device("cpu"), "gloo", dist.group.WORLD)
    recorder = FlightRecorder()
    Watchdog(recorder, rank, world, timeout, default_store(), dump_dir).start()
    dispatcher = AllToAllDispatcher(state, 16, recorder=recorder)
    x, ids, w = torch.randn(4, 16), torch.randint(0, 8, (4, 2)), torch.rand(4, 2)
    for layer in range(3):  # a few healthy collectives first
        routed = dispatcher.dispatch(x, ids, w, layer=layer)
        dispatcher.combine(routed.x_ND, routed.handle)
    if rank == stall_rank:
        time.sleep(120)
    dispatcher.dispatch(x, ids, w, layer=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
