"""A multi-turn chat workload for the KV tier benchmarks: sessions whose context grows turn by turn.

Each session starts from one of a few shared system prompts; every turn adds a user message, the prompt
is the whole conversation so far, and the model's answer joins the context of the next turn. Turns of a
session are separated by think time, so many other sessions' requests come in between and a session's
prefix is cold on the device by the time it returns: the reuse a cache below the device can catch and a
device-sized cache cannot. Sessions start as a Poisson process; everything is drawn from one seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    session: int
    turn: int
    arrival: float
    """Seconds from the start of the run."""
    prompt: tuple[int, ...]
    output: tuple[int, ...]
    """The answer this turn gives (the next turn's prompt contains it)."""


@dataclass(frozen=True)
class WorkloadSpec:
    sessions: int = 48
    turns: int = 6
    system_prompts: int = 4
    system_len: int = 256
    user_len: tuple[int, int] = (32, 96)
    output_len: tuple[int, int] = (32, 96)
    session_rate: float = 2.0
    """Sessions starting per second (Poisson)."""
    think_s: float = 8.0
    """Mean think time between a session's turns (exponential)."""
    vocab: int = 30000
    seed: int = 0


class HitRate:
    """`hits` and `hit_rate` of a benchmark's result: prompt tokens served from a cache (`hit_tokens`, per
    tier) over `prompt_tokens`."""

    hit_tokens: dict[str, int]
    prompt_tokens: int

    @property
    def hits(self) -> int:
        return sum(self.hit_tokens.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.prompt_tokens, 1)


def multi_turn(spec: WorkloadSpec) -> list[Turn]:
    """Every turn of every session, in arrival order."""
    rng = random.Random(spec.seed)
    draw = lambda n: tuple(rng.randrange(spec.vocab) for _ in range(n))  # noqa: E731
    systems = [draw(spec.system_len) for _ in range(spec.system_prompts)]
    turns, start = [], 0.0
    for s in range(spec.sessions):
        start += rng.expovariate(spec.session_rate)
        context, clock = systems[s % spec.system_prompts], start
        for t in range(spec.turns):
            prompt = context + draw(rng.randint(*spec.user_len))
            output = draw(rng.randint(*spec.output_len))
            turns.append(Turn(s, t, clock, prompt, output))
            context = prompt + output
            clock += rng.expovariate(1 / spec.think_s)
    return sorted(turns, key=lambda t: t.arrival)


def working_set_pages(turns: list[Turn], block_size: int) -> int:
    """Distinct full pages over every prompt and answer: what an unbounded cache would end up holding."""
    pages = set()
    for t in turns:
        tokens = t.prompt + t.output
        for end in range(block_size, len(tokens) + 1, block_size):
            pages.add(tokens[:end])
    return len(pages)
