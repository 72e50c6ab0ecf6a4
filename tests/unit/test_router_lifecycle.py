"""The router's request lifecycle under random event sequences (hypothesis): arrivals, waiting for room, a
reservation refused for room, a queue timeout, a refusal, answers, failures, a lost instance and migration
after tokens were streamed, against instances that remember what they hold until they answer finally or are
told to abort. After every event: nothing of an ended attempt is held anywhere, and the table's counters
equal the live attempts. (The ranks' lifecycle: test_request_lifecycle.py.)"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from moe_pd.kvcache.transfer.base import KVTarget
from moe_pd.serve import protocol as p
from moe_pd.serve.router_requests import DOWN, Phase, RouterRequests

KV_D0 = KVTarget("zmq", "tcp://d0", 30.0)


class FakeInstance:
    """An instance as the router sees it: it holds what it was given until it answers finally or is told
    to abort."""

    def __init__(self, address: str, role: str) -> None:
        self.address, self.role, self.up = address, role, True
        self.held: set[str] = set()

    def send(self, msg: p.Message) -> None:
        if isinstance(msg, p.Abort):
            self.held.discard(msg.rid)
        elif self.up:
            self.held.add(msg.rid)


class RouterLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = RouterRequests()
        self.decode, self.prefill, self.colocated = (FakeInstance("d", "decode"), FakeInstance("p", "prefill"),
                                                     FakeInstance("c", "colocated"))
        self.attempts = []
        self.n = 0

    def _pick(self, i: int, *phases: Phase):
        live = [a for a in self.table.attempts.values() if a.phase in phases]
        return live[i % len(live)] if live else None

    def _answer(self, instance: FakeInstance, attempt, msg: p.Message, final: bool) -> None:
        """The instance answers; the attempt's flow reads its inbox (only a holder's answers get there)."""
        held = instance in attempt.holders
        if final:
            instance.held.discard(attempt.rid)
        self.table.deliver(instance, msg)
        if held:
            assert attempt.inbox.get_nowait() == (instance, msg)
        assert attempt.inbox.empty()

    @rule()
    def arrive(self) -> None:
        """A request waits at the router (back-pressure) until an instance has room."""
        self.n += 1
        self.attempts.append(self.table.open(f"r{self.n}", 0))

    @rule(i=st.integers(0, 99), colocated=st.booleans())
    def room(self, i: int, colocated: bool) -> None:
        """An instance has room: the waiting attempt asks it (a reservation, or the whole request)."""
        attempt = self._pick(i, Phase.WAITING)
        inst = self.colocated if colocated else self.decode
        if attempt is None or not inst.up:
            return
        self.table.transition(attempt, Phase.PREFILLING if colocated else Phase.RESERVING)
        attempt.decode = inst
        msg = p.Generate(attempt.rid, [1], 4) if colocated else p.Reserve(attempt.rid, [1], 4)
        self.table.send(attempt, inst, msg)

    @rule(i=st.integers(0, 99))
    def refused_for_room(self, i: int) -> None:
        """The decode instance had no pages after all: the attempt waits again, holding nothing."""
        attempt = self._pick(i, Phase.RESERVING)
        if attempt is None or self.decode not in attempt.holders:
            return
        self._answer(self.decode, attempt, p.Error(attempt.rid, "no free KV cache pages", retry=True, status=503),
                     final=True)
        self.table.transition(attempt, Phase.WAITING)
        assert attempt.holders == [] and attempt.decode is None

    @rule(i=st.integers(0, 99))
    def waited_too_long(self, i: int) -> None:
        attempt = self._pick(i, Phase.WAITING)
        if attempt is not None:
            self.table.transition(attempt, Phase.FAILED)

    @rule(i=st.integers(0, 99))
    def migrate(self, i: int) -> None:
        """The attempt fails after tokens were streamed (its decode instance died, or failed it): it ends FAILED
        (aborted wherever held) and the next attempt waits with the streamed tokens in its prompt."""
        attempt = self._pick(i, Phase.STREAMING, Phase.PREFILLING)
        if attempt is None:
            return
        self.table.transition(attempt, Phase.FAILED)
        number = int(attempt.rid.rsplit(".", 1)[1]) + 1
        self.attempts.append(self.table.open(attempt.request_id, number, resumed=attempt.resumed + 1))

    @rule(i=st.integers(0, 99))
    def reserved(self, i: int) -> None:
        attempt = self._pick(i, Phase.RESERVING)
        if attempt is None or self.decode not in attempt.holders or not self.prefill.up:
            return
        self._answer(self.decode, attempt, p.Reserved(attempt.rid, KV_D0, 0), final=False)
        attempt.prefill = self.prefill
        self.table.transition(attempt, Phase.PREFILLING)
        self.table.send(attempt, self.prefill, p.Prefill(attempt.rid, [1], KV_D0))

    @rule(i=st.integers(0, 99), finished=st.booleans())
    def tokens(self, i: int, finished: bool) -> None:
        attempt = self._pick(i, Phase.PREFILLING, Phase.STREAMING)
        if attempt is None or attempt.decode not in attempt.holders:
            return
        self._answer(attempt.decode, attempt, p.Tokens(attempt.rid, [3], finished), final=finished)
        if attempt.phase is Phase.PREFILLING:
            self.table.transition(attempt, Phase.STREAMING)
        if finished:
            self.table.transition(attempt, Phase.FINISHED)

    @rule(i=st.integers(0, 99), done=st.booleans())
    def prefilled(self, i: int, done: bool) -> None:
        attempt = self._pick(i, Phase.PREFILLING, Phase.STREAMING)
        if attempt is None or self.prefill not in attempt.holders:
            return
        self._answer(self.prefill, attempt, p.Prefilled(attempt.rid, "done" if done else "timed_out"), final=True)
        if not done:
            self.table.transition(attempt, Phase.FAILED)

    @rule(i=st.integers(0, 99), from_prefill=st.booleans(), status=st.sampled_from([400, 500, 503]))
    def error(self, i: int, from_prefill: bool, status: int) -> None:
        """An instance refuses (400: the request's content) or fails it (500, 503)."""
        attempt = self._pick(i, Phase.RESERVING, Phase.PREFILLING, Phase.STREAMING)
        source = attempt and (attempt.prefill if from_prefill else attempt.decode)
        if attempt is None or source not in attempt.holders:
            return
        self._answer(source, attempt, p.Error(attempt.rid, "no", retry=status == 503, status=status), final=True)
        self.table.transition(attempt, Phase.FAILED)

    @rule(which=st.sampled_from(["d", "p", "c"]))
    def instance_down(self, which: str) -> None:
        inst = {"d": self.decode, "p": self.prefill, "c": self.colocated}[which]
        inst.up = False
        inst.held.clear()  # gone with everything it held
        hit = [a for a in self.table.attempts.values() if inst in a.holders]
        self.table.instance_down(inst)
        for attempt in hit:
            assert attempt.inbox.get_nowait()[1] == DOWN
            self.table.transition(attempt, Phase.FAILED)  # the flow fails (or re-runs) it

    @rule(which=st.sampled_from(["d", "p", "c"]))
    def instance_back(self, which: str) -> None:
        {"d": self.decode, "p": self.prefill, "c": self.colocated}[which].up = True

    @rule(i=st.integers(0, 99))
    def client_goes_away(self, i: int) -> None:
        attempt = self._pick(i, Phase.WAITING, Phase.RESERVING, Phase.PREFILLING, Phase.STREAMING)
        if attempt is not None:
            self.table.transition(attempt, Phase.ABORTED)

    @invariant()
    def nothing_of_an_ended_attempt_is_held(self) -> None:
        self.table.check()
        ended = {a.rid: a for a in self.attempts if a.phase.final}
        assert not set(ended) & set(self.table.attempts)
        for attempt in ended.values():
            assert attempt.holders == []
        for inst in (self.decode, self.prefill, self.colocated):
            for rid in inst.held & set(ended):
                # only a prefill instance whose request finished may still be shipping: decode has the KV
                assert inst is self.prefill and ended[rid].phase is Phase.FINISHED, (inst.address, ended[rid])
        live = Counter(a.phase for a in self.table.attempts.values())
        assert sum(live.values()) == len(self.attempts) - len(ended)
        assert self.table.count(Phase.WAITING) == live[Phase.WAITING]
        for attempt in self.table.attempts.values():  # one live attempt per request, never two
            assert sum(a.request_id == attempt.request_id for a in self.table.attempts.values()) == 1


TestRouterLifecycle = RouterLifecycle.TestCase
TestRouterLifecycle.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
