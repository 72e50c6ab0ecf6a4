"""Runs two micro-batches' stage lists interleaved, as DeepSeek's prefill and decode schedules do.

The model is the list of every layer's stages (transformer.STAGES). A schedule says after which stages a
micro-batch yields, and how many chunks micro-batch 0 runs before micro-batch 1 starts (delta):
- prefill: yield after SHARED (dispatch issued) and after MLP (combine issued); delta 0. While one
  micro-batch's all-to-all is in flight, the other computes attention or experts.
- decode: yield after each of the first five stages (ATTN-0 | ATTN-1 | dispatch + SHARED | MLP | combine);
  delta 2, so micro-batch 1 runs two stages behind micro-batch 0 (DeepSeek's five-stage pipeline).
The stages are the plain forward's own functions, so overlap changes the order of work, not the math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_pd.model.transformer import STAGES, DeepseekForCausalLM, StageState


@dataclass(frozen=True)
class Schedule:
    name: str
    yield_after: frozenset[str]
    delta: int


PREFILL = Schedule("prefill", frozenset({"SHARED", "MLP"}), 0)
DECODE = Schedule("decode", frozenset(STAGES[:5]), 2)


def chunks(model: DeepseekForCausalLM, schedule: Schedule) -> list[list[Callable[[StageState], None]]]:
    """Every layer's stages, grouped into the runs between yield points."""
    out: list[list[Callable]] = [[]]
    for layer in model.model.layers:
        for name, stage in zip(STAGES, layer.stages(), strict=True):
            out[-1].append(stage)
            if name in schedule.yield_after:
                out.append([])
    return [c for c in out if c]


def run_interleaved(model: DeepseekForCausalLM, states: list[StageState], schedule: Schedule) -> None:
    """Advances micro-batch 0 by `delta` chunks, then both in turn (0 before 1), then finishes 1."""
    plan = chunks(model, schedule)
    first, second = states
    order = [(first, i) for i in range(schedule.delta)]
    for i in range(schedule.delta, len(plan)):
        order += [(first, i), (second, i - schedule.delta)]
    order += [(second, i) for i in range(len(plan) - schedule.delta, len(plan))]
    for state, i in order:
        for stage in plan[i]:
            stage(state)


def forward_two_micro_batches(model: DeepseekForCausalLM, micro_batches, cache, schedule: Schedule,
                              attn_mode: str = "auto") -> torch.Tensor:
    """Hidden states of both micro-batches' tokens, in step order."""
    states = []
    for index, (ids_T, batch) in enumerate(micro_batches):
        states.append(StageState(model.model.embed_tokens(ids_T), batch, cache, attn_mode, label=f"({index})"))
    run_interleaved(model, states, schedule)
    return model.model.norm(torch.cat([s.hidden_TD for s in states]))
