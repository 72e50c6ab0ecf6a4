"""Ranks of one EP group step together: every forward runs every MoE layer's collectives, so a rank with
nothing to do still runs an empty step until no rank has work left."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_pd.parallel.dispatch.base import Dispatcher
from moe_pd.parallel.flight_recorder import FlightRecorder
from moe_pd.parallel.state import ParallelState


class StepSync:
    """One small all-reduce per step: does any rank have work, and the most tokens any rank runs. The
    dispatcher hears the latter (`begin_step`), so a choice such as DeepEP's normal vs low-latency
    kernels is made identically on every rank."""

    def __init__(self, state: ParallelState, recorder: FlightRecorder | None = None,
                 dispatcher: Dispatcher | None = None, hooks: list[Callable[[], None]] | None = None) -> None:
        """`hooks` run on every rank after each busy step's sync, at the same step (EPLB uses this)."""
        self.state, self.recorder, self.dispatcher = state, recorder, dispatcher
        self.hooks = list(hooks or [])
        device = state.device if state.backend == "nccl" else "cpu"
        self._flags = torch.zeros(3, dtype=torch.int64, device=device)
        self.max_tokens = 0
        """The largest token count of any rank in the last step."""
        self.max_query_len = 0
        """The longest run of new tokens of one sequence on any rank (1: every rank decodes)."""

    def step(self, busy: bool, num_tokens: int, max_query_len: int = 1) -> bool:
        if self.state.world_size > 1:
            self._flags[0], self._flags[1], self._flags[2] = int(busy), num_tokens, max_query_len
            entry = self.recorder.start("step.sync", "", 1, 1, 24) if self.recorder else None
            dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=self.state.group)
            if entry is not None:
                self.recorder.finish(entry)
            flags = self._flags.tolist()
            busy, num_tokens, max_query_len = bool(flags[0]), int(flags[1]), int(flags[2])
        self.max_tokens, self.max_query_len = num_tokens, max_query_len
        if busy:
            for hook in self.hooks:
                hook()
            if self.dispatcher is not None:
                self.dispatcher.begin_step(num_tokens)
        return busy


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
