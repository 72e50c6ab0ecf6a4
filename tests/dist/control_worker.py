"""torchrun worker: ControlPlane.exchange on every rank, through payloads that overflow the buffer (a second
round, the same growth on every rank) and back to small ones. Writes OUT_DIR/rank<r>.json (OUT_DIR: the
first argument) with what it received and its buffer capacity; the test asserts on those
(tests/dist/test_control_plane.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from moe_pd.parallel.control_plane import ControlPlane
from moe_pd.parallel.state import join_process_group

STEPS = 5
CAPACITY = 1024


def payload(rank: int, step: int) -> dict:
    big = step == 2 and rank == 1  # one rank's payload outgrows the buffer once
    return {"rank": rank, "step": step, "events": [{"ids": list(range(rank + step))}] * (3000 if big else 1)}


def main() -> int:
    join_process_group("gloo")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    plane = ControlPlane(world, "gloo", capacity=CAPACITY)
    received, sizes = [], []
    for step in range(STEPS):
        got = [msgspec.msgpack.decode(raw) for raw in plane.exchange(msgspec.msgpack.encode(payload(rank, step)))]
        received.append([(g["rank"], g["step"], len(g["events"]), g == payload(g["rank"], step)) for g in got])
        sizes.append(plane.capacity)
    dist.destroy_process_group()
    report = {"rank": rank, "world": world, "received": received, "capacity": sizes}
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
