"""Ranks of one EP group step together: every forward runs every MoE layer's collectives, so a rank with
nothing to do still runs an empty step until no rank has work left."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_pd.parallel.flight_recorder import FlightRecorder
from moe_pd.parallel.state import ParallelState


class StepSync:
    def __init__(self, state: ParallelState, recorder: FlightRecorder | None = None) -> None:
        self.state, self.recorder = state, recorder
        self._flag = torch.zeros(1, dtype=torch.int32, device=state.device if state.backend == "nccl" else "cpu")

    def any_rank_busy(self, busy: bool) -> bool:
        """All-reduce (max) of `busy` over the EP group."""
        if self.state.world_size == 1:
            return busy
        self._flag.fill_(int(busy))
        entry = self.recorder.start("step.sync", "", 1, 1, 4) if self.recorder else None
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.state.group)
        if entry is not None:
            self.recorder.finish(entry)
        return bool(self._flag.item())


def balance_by_tokens(lengths: list[int], num_ranks: int) -> list[int]:
    """Owner rank per prompt: longest first onto the rank with the fewest tokens (then fewest prompts,
    then lowest rank). Pure and deterministic, so every rank computes the same assignment."""
    load = [(0, 0, r) for r in range(num_ranks)]
    owner = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(num_ranks), key=lambda r: load[r])
        owner[i] = r
        tokens, count, _ = load[r]
        load[r] = (tokens + lengths[i], count + 1, r)
    return owner
