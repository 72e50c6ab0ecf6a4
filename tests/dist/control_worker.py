"""torchrun worker: ControlPlane.exchange gives every rank every payload in rank order, through payloads
that overflow the buffer (a second round, the same growth on every rank) and back to small ones."""

from __future__ import annotations

import sys

from moe_pd.parallel.state import join_process_group
from moe_pd.serve.service import ControlPlane


def payload(rank: int, step: int) -> dict:
    big = step == 2 and rank == 1  # one rank's payload outgrows the buffer once
    return {"rank": rank, "step": step, "events": [{"ids": list(range(rank + step))}] * (3000 if big else 1),
            "stop": False}


def main() -> int:
    join_process_group("gloo")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    plane = ControlPlane(world, "gloo", capacity=1024)
    failures = []
    for step in range(5):
        got = plane.exchange(payload(rank, step))
        if got != [payload(r, step) for r in range(world)]:
            failures.append(f"step {step}: wrong payloads")
    capacities = [None] * world
    dist.all_gather_object(capacities, plane.capacity)
    if len(set(capacities)) != 1 or plane.capacity <= 1024:
        failures.append(f"buffers grew differently or not at all: {capacities}")
    dist.destroy_process_group()
    for failure in failures:
        print(f"rank {rank}: {failure}", file=sys.stderr)
    print(f"rank {rank}: control plane ok" if not failures else "", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
