"""The router's record of every request attempt: where it is, which instances hold something of it, and the
queue its answers land in. One table per router; instances hand it their messages, and it alone decides
which attempt (if any) a message belongs to.

    PD:        WAITING --> RESERVING --Reserved--> PREFILLING --Tokens--> STREAMING --last Tokens--> FINISHED
                  ^            |  refused: no free pages (back-pressure: wait for room again)
                  '------------'
    colocated: WAITING --------------------------> PREFILLING --Tokens--> STREAMING --last Tokens--> FINISHED
    any live state --> FAILED (an error, a lost instance, no progress, no room in time: a re-run, or a
                              migration after tokens were streamed, is a new attempt)
                   --> ABORTED (the client went away)

An instance holds an attempt from the message that gives it work until its final answer for it (decode:
the last Tokens or an Error; prefill: Prefilled or an Error). Ending an attempt in FAILED or ABORTED sends
Abort to every instance still holding it (saying whether a prefill instance was ever asked to write its KV,
so a decode rank knows whether a write may still land), so nothing of an abandoned attempt keeps pages anywhere; a
FINISHED attempt needs none (a prefill instance still shipping has its answer from decode on the way).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from typing import Protocol

from moe_pd.serve import protocol as p

log = logging.getLogger("moe_pd.serve.router")


class Instance(Protocol):
    address: str
    role: str

    @property
    def up(self) -> bool: ...

    def send(self, msg: p.Message) -> None: ...


class Phase(enum.Enum):
    WAITING = "waiting"
    """Queued at the router until an instance has room (bounded in number and time); it holds nothing."""
    RESERVING = "reserving"
    """PD: a decode instance was asked to reserve pages."""
    PREFILLING = "prefilling"
    """Waiting for the first token: prefill runs the prompt and ships its KV (PD), or the colocated instance
    runs it."""
    STREAMING = "streaming"
    """Tokens reach the client; an attempt that fails from here is migrated (the next attempt resumes after
    the streamed tokens)."""
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def final(self) -> bool:
        return self in (Phase.FINISHED, Phase.FAILED, Phase.ABORTED)


NEXT = {
    Phase.WAITING: {Phase.RESERVING, Phase.PREFILLING, Phase.FAILED, Phase.ABORTED},
    Phase.RESERVING: {Phase.WAITING, Phase.PREFILLING, Phase.FAILED, Phase.ABORTED},
    Phase.PREFILLING: {Phase.STREAMING, Phase.FAILED, Phase.ABORTED},
    Phase.STREAMING: {Phase.FINISHED, Phase.FAILED, Phase.ABORTED},
}

DOWN = "down"
"""Put in an attempt's inbox in place of a message when an instance holding it is marked down."""


@dataclass(eq=False)
class Attempt:
    rid: str
    """The request id plus the attempt number (`cmpl-...`.1): what the instances know it by."""
    request_id: str
    phase: Phase
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    """(instance, message or DOWN) for every answer that belongs to this attempt."""
    decode: Instance | None = None
    """The decode (or colocated) instance it runs on."""
    prefill: Instance | None = None
    holders: list[Instance] = field(default_factory=list)
    """Instances that hold something of it (pages, a queue place, a transfer) until their final answer."""
    address: str = ""
    """PD: the decode rank's KV address, from Reserved."""
    resumed: int = 0
    """Tokens an earlier attempt already streamed to the client: this attempt's prompt ends with them
    (migration, as Dynamo's: the client's stream continues)."""


def final_for(instance: Instance, attempt: Attempt, msg: p.Message) -> bool:
    """The instance's last answer about this attempt (it holds nothing of it afterwards)."""
    if isinstance(msg, p.Error):
        return True
    if instance is attempt.prefill and instance is not attempt.decode:
        return isinstance(msg, p.Prefilled)
    return isinstance(msg, p.Tokens) and msg.finished


class RouterRequests:
    def __init__(self) -> None:
        self.attempts: dict[str, Attempt] = {}
        """Live attempts by rid; a final one is gone."""
        self.tasks: dict[str, asyncio.Task] = {}
        """Each request's flow (all its attempts), by request id, while it runs."""

    def open(self, request_id: str, number: int, phase: Phase = Phase.WAITING, resumed: int = 0) -> Attempt:
        attempt = Attempt(f"{request_id}.{number}", request_id, phase, resumed=resumed)
        self.attempts[attempt.rid] = attempt
        return attempt

    def count(self, phase: Phase) -> int:
        return sum(a.phase is phase for a in self.attempts.values())

    def send(self, attempt: Attempt, instance: Instance, msg: p.Message) -> None:
        """Gives the instance work for the attempt: it holds the attempt until its final answer."""
        if instance not in attempt.holders:
            attempt.holders.append(instance)
        instance.send(msg)

    def deliver(self, instance: Instance, msg: p.Message) -> None:
        """An instance's answer: into the inbox of the attempt it belongs to; dropped when that attempt is
        over or the instance has nothing of it (a late answer)."""
        attempt = self.attempts.get(getattr(msg, "rid", ""))
        if attempt is None or instance not in attempt.holders:
            return
        if final_for(instance, attempt, msg):
            attempt.holders.remove(instance)
        attempt.inbox.put_nowait((instance, msg))

    def instance_down(self, instance: Instance) -> None:
        """Every attempt the instance held hears DOWN; the instance holds nothing any more."""
        for attempt in list(self.attempts.values()):
            if instance in attempt.holders:
                attempt.holders.remove(instance)
                attempt.inbox.put_nowait((instance, DOWN))

    def transition(self, attempt: Attempt, phase: Phase) -> None:
        """Moves the attempt on; a final phase releases everything it holds and forgets it."""
        if attempt.phase.final or phase not in NEXT[attempt.phase]:
            raise ValueError(f"attempt {attempt.rid}: no transition {attempt.phase.value} -> {phase.value}")
        attempt.phase = phase
        if phase is Phase.WAITING:  # refused for room: the instance that refused holds nothing of it
            attempt.decode, attempt.address = None, ""
        if not phase.final:
            return
        holders, attempt.holders = attempt.holders, []
        del self.attempts[attempt.rid]
        if phase is not Phase.FINISHED:
            for instance in holders:
                try:
                    instance.send(p.Abort(attempt.rid, writer=attempt.prefill is not None))
                except Exception:  # the record is gone already; the instance's own timeout frees the rest
                    log.exception("could not abort %s on %s", attempt.rid, instance.address)

    def end(self, attempt: Attempt, phase: Phase) -> None:
        """`transition` to a final phase unless the attempt already ended (for `finally` clauses)."""
        if not attempt.phase.final:
            self.transition(attempt, phase)

    def check(self) -> None:
        """The table's invariants (tests call this after every event)."""
        for rid, attempt in self.attempts.items():
            assert rid == attempt.rid and not attempt.phase.final, attempt
            assert set(attempt.holders) <= {attempt.decode, attempt.prefill} - {None}, attempt
            assert attempt.prefill is None or attempt.phase not in (Phase.RESERVING, Phase.WAITING), attempt
            assert attempt.phase is not Phase.WAITING or not attempt.holders, attempt
