"""The request lifecycle under random event sequences (hypothesis): arrivals, steps, KV transfers that land,
get lost or are refused, answers that get lost, timeouts, aborts and a lost instance, for a receiver that
copies the bytes itself (zmq) and for one-sided writes that may land late (NIXL: reservations FENCED); and
the failure paths of issue "Reliability": rejected requests (hostile content), a step that fails one request
(no token could be sampled), a failure at any state (a transfer that cannot be sent, a rank's command
error), a client that disconnects at any state (the router's side: test_router_lifecycle.py). After every
event: nothing is held by a request that ended, every counter equals the sum over live requests, and (NIXL)
no write lands in pages its request no longer holds.

Rank level: a prefill rank and a decode rank (which also takes colocated requests), each a Scheduler over
its RequestTable, driven the way moe_pd.engine.disagg drives them, with the wire in between modelled as
lists."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from moe_pd.engine.core.request import HOLDS, InvalidRequest, Request, State
from moe_pd.engine.core.scheduler import Scheduler
from moe_pd.kvcache.block_manager import BlockManager, OutOfBlocks
from moe_pd.kvcache.transfer.base import KVTarget, Transfer, TransferState

TIMEOUT = 5.0
CONTEXT = 64


def fake_token(req: Request) -> int:
    return (sum(req.token_ids) * 31 + len(req.token_ids)) % 50 + 1


class FakePromotion:
    """Copies from a KV tier that end when the test says so (or when the scheduler waits for them)."""

    def __init__(self, n: int, intact: int) -> None:
        self.sources, self.intact, self.done, self.seconds = ["dram"] * n, intact, False, 0.001

    def ready(self) -> bool:
        return self.done

    def wait(self, timeout=None) -> int:
        self.done = True
        return self.intact


class FakeTiers:
    """A tier below the device that holds every page; one promotion in three loses its second half on the
    way."""

    def __init__(self) -> None:
        self.promotions: list[FakePromotion] = []

    def lookup(self, entries):
        return [("dram", e) for e in entries]

    def promote(self, pages):
        promotion = FakePromotion(len(pages), len(pages) // 2 if len(self.promotions) % 3 == 2 else len(pages))
        self.promotions.append(promotion)
        return promotion

    def offer(self, pages) -> None:
        pass


def step(scheduler: Scheduler, fail: int = -1) -> None:
    """One step; the sampling row `fail` (if any) gets no token and fails its request alone."""
    plan = scheduler.schedule()
    rows = [s.seq for s in plan.scheduled if s.samples]
    failed = {rows[fail % len(rows)].request_id: "no token"} if fail >= 0 and rows else {}
    scheduler.update(plan, {r.request_id: fake_token(r) for r in rows if r.request_id not in failed}, failed)
    for rid in failed:
        assert rid not in scheduler.requests


def new_side(hold: bool, pages: int) -> Scheduler:
    """A rank; prefill ranks (`hold`) have a KV tier below their device pages."""
    return Scheduler(BlockManager(pages, 4, tier_root=b"model digest 16b" if hold else None), max_num_seqs=3,
                     token_budget=24, max_context=CONTEXT, hold_finished_pages=hold, vocab_size=100,
                     tiers=FakeTiers() if hold else None)


class RankLifecycle(RuleBasedStateMachine):
    """zmq: the receiver copies arriving bytes itself, so a reservation that ends frees its pages at once."""

    FENCE = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.prefill, self.decode = new_side(True, 12), new_side(False, 16)
        self.clock = 0.0
        self.records: dict[int, list[Request]] = {id(self.prefill): [], id(self.decode): []}
        self.kv_wire: list[tuple[str, list[int], float]] = []
        """prefill -> decode: KV on its way (request id, the pages it names, the latest it may land)."""
        self.answers: list[tuple[str, TransferState]] = []  # decode (zmq) or the write itself (NIXL) -> prefill
        self.notices: list[tuple[str, bool]] = []  # NIXL: prefill gave up on a request (id, nothing was posted)
        self.targets: dict[str, tuple[list[int], float]] = {}  # the reservation's pages and deadline, as sent
        self.shipped: set[str] = set()
        self.n = 0

    def _new(self, side: Scheduler, req: Request) -> None:
        self.records[id(side)].append(req)

    # arrivals -------------------------------------------------------------------------------------------------
    @rule(prompt=st.integers(1, 40), max_new=st.integers(1, 30))
    def arrive_pd(self, prompt: int, max_new: int) -> None:
        self.n += 1
        rid, ids = f"pd{self.n}", [self.n % 90 + i % 7 for i in range(prompt)]
        try:
            self.decode.reserve(req := Request(ids, max_new, rid), Transfer(self.clock + TIMEOUT))
        except (OutOfBlocks, InvalidRequest):
            return  # the leader answers 503 / 400; prefill never sees it
        self._new(self.decode, req)
        self.targets[rid] = (self.decode.requests.prompt_pages(req), self.clock + TIMEOUT)
        target = KVTarget("nixl" if self.FENCE else "zmq", "d", TIMEOUT, self.targets[rid][0])
        self._new(self.prefill, self.prefill.add(Request(ids, 1, rid, ignore_eos=True, destination=target)))

    @rule(prompt=st.integers(1, 70), max_new=st.integers(1, 30))
    def arrive_colocated(self, prompt: int, max_new: int) -> None:
        self.n += 1
        try:
            self._new(self.decode, self.decode.add(Request([7] * prompt, max_new, f"co{self.n}")))
        except InvalidRequest:
            pass

    @rule(kind=st.sampled_from(["outside_vocab", "empty", "too_long", "too_big", "duplicate"]),
          on_prefill=st.booleans())
    def arrive_hostile(self, kind: str, on_prefill: bool) -> None:
        """Content no rank can run is refused at the door and leaves nothing behind."""
        side = self.prefill if on_prefill else self.decode
        before = (len(side.requests), side.allocator.num_used, dict(side.requests.by_state))
        live = sorted(side.requests.live)
        if kind == "duplicate" and not live:
            return
        rid = live[0] if kind == "duplicate" else f"bad{self.n}"
        prompt = {"outside_vocab": [5, 100, 7], "empty": [], "too_long": [3] * CONTEXT}.get(kind, [3, 4])
        max_new = 10**6 if kind == "too_big" else 4
        try:
            if kind == "too_big" or on_prefill:  # on prefill: a target that names no reservation
                target = KVTarget("nixl" if self.FENCE else "zmq", "d", TIMEOUT) if on_prefill else None
                req = Request(prompt, max_new, rid, destination=target)
                side.add(req)
            else:
                side.reserve(Request(prompt, max_new, rid), Transfer(self.clock + TIMEOUT))
        except InvalidRequest:
            assert (len(side.requests), side.allocator.num_used, dict(side.requests.by_state)) == before
            return
        assert kind == "too_big", kind  # a huge max_new_tokens is capped at the context, not refused
        self._new(side, side.requests.get(rid))

    @rule(on_prefill=st.booleans(), i=st.integers(0, 99))
    def fail_at_any_state(self, on_prefill: bool, i: int) -> None:
        """A failure that names one request (its KV could not be sent, a command error): FAILED from wherever
        it is, releasing everything."""
        side = self.prefill if on_prefill else self.decode
        live = sorted(side.requests.live)
        if live:
            req = side.requests.get(live[i % len(live)])
            if req.state is State.FENCED:
                return  # ended already: its client has its error, its pages wait for the fence
            if self.FENCE and req.state is State.RESERVED:  # a write may still land: the reservation is fenced
                side.requests.fence(req, TransferState.CANCELLED, "failed", "error: failed", self.FENCE)
                return
            if req.transfer is not None:
                req.transfer.finish(TransferState.CANCELLED, "failed")
            side.requests.transition(req, State.FAILED, "error: failed")
            assert not req.block_table and req.transfer is None

    # steps and the wire ---------------------------------------------------------------------------------------
    @rule(fail=st.integers(-1, 3))
    def step_prefill_failing_one(self, fail: int) -> None:
        step(self.prefill, fail)
        self._ship()

    @rule(fail=st.integers(-1, 3))
    def step_decode_failing_one(self, fail: int) -> None:
        step(self.decode, fail)

    @rule()
    def step_prefill(self) -> None:
        step(self.prefill)
        self._ship()

    def _ship(self) -> None:
        for req in self.prefill.requests.in_state(State.PREFILLED):
            pages, expires = self.targets.get(req.request_id, ([], self.clock + TIMEOUT))
            req.transfer = Transfer(min(self.clock + TIMEOUT, expires), "d")
            self.prefill.requests.transition(req, State.TRANSFERRING)
            self.shipped.add(req.request_id)
            # never posted past the reservation's expiry, nor (NIXL) to no pages; the receiver is told
            if self.clock >= expires or (self.FENCE and not pages):
                req.transfer.finish(TransferState.FAILED, "the reservation expired")
                self.prefill.requests.transition(req, State.FAILED)
                self.notices.append((req.request_id, True))
            else:  # a write lands at the latest a drain after the reservation's end, within the fence
                self.kv_wire.append((req.request_id, pages, expires + self.FENCE / 2))

    @rule()
    def step_decode(self) -> None:
        step(self.decode)

    def _land(self, rid: str, pages: list[int], fits: bool) -> None:
        req = self.decode.requests.get(rid)
        if self.FENCE:  # one-sided: the bytes land whatever decode thinks; only pages still held may take them
            assert req is not None and req.state in (State.RESERVED, State.FENCED), (rid, req and req.state)
            assert req.block_table[:len(pages)] == pages, (req.block_table, pages)
            self.answers.append((rid, TransferState.DONE))  # the write itself completed
            if req.state is State.FENCED:
                self.decode.requests.reclaim(req)  # the notice proves the write ended
                return
        if req is None or req.state is not State.RESERVED:
            self.answers.append((rid, TransferState.REJECTED))
        elif fits:
            self.decode.activate(req, 5)
            self.answers.append((rid, TransferState.DONE))
        else:  # mismatched: refused, the reservation ends
            req.transfer.finish(TransferState.REJECTED, "does not fit")
            self.decode.requests.transition(req, State.FAILED, "error: KV transfer rejected")
            self.answers.append((rid, TransferState.REJECTED))

    @rule(i=st.integers(0, 99), fits=st.booleans())
    def kv_arrives(self, i: int, fits: bool) -> None:
        if self.kv_wire:
            rid, pages, _ = self.kv_wire.pop(i % len(self.kv_wire))
            self._land(rid, pages, fits)

    @rule(i=st.integers(0, 99))
    def promotion_lands(self, i: int) -> None:
        """Copies from the tier end (the next step takes the request into the batch, or frees the pages of one
        that ended meanwhile)."""
        pending = [x for x in self.prefill.tiers.promotions if not x.done]
        if pending:
            pending[i % len(pending)].done = True

    @rule(i=st.integers(0, 99))
    def kv_lost(self, i: int) -> None:
        if self.kv_wire:
            self.kv_wire.pop(i % len(self.kv_wire))

    @rule(i=st.integers(0, 99), lost=st.booleans())
    def answer_arrives(self, i: int, lost: bool) -> None:
        if not self.answers:
            return
        rid, state = self.answers.pop(i % len(self.answers))
        req = self.prefill.requests.get(rid)
        if lost or req is None or req.state is not State.TRANSFERRING:
            return
        req.transfer.finish(state)
        self.prefill.requests.transition(req, State.FINISHED if state is TransferState.DONE else State.FAILED)

    @rule(i=st.integers(0, 99))
    def notice_arrives(self, i: int) -> None:
        """NIXL: prefill's 'gave up' notice (best effort, so it may also never come)."""
        if not self.notices:
            return
        rid, quiet = self.notices.pop(i % len(self.notices))
        req = self.decode.requests.get(rid)
        if req is None or not quiet:
            return
        if req.state is State.FENCED:
            self.decode.requests.reclaim(req)
        elif req.state is State.RESERVED:
            req.transfer.finish(TransferState.FAILED, "the sender gave up")
            self.decode.requests.transition(req, State.FAILED, "error: KV transfer failed")

    def _expire(self) -> None:
        for side in (self.prefill, self.decode):
            fence = self.FENCE if side is self.decode else 0.0
            for req, transfer in side.requests.expired(self.clock, fence):
                assert transfer.state is TransferState.TIMED_OUT
                assert req.state is (State.FENCED if fence and "transfer" in HOLDS[req.state] else State.FAILED)

    @rule(dt=st.floats(0.5, 6.0))
    def time_passes(self, dt: float) -> None:
        """Writes still on the wire land as late as they may (just before their bound), after the deadlines
        up to then took effect (twice: the receiver polls often)."""
        end = self.clock + dt
        for write in sorted([w for w in self.kv_wire if w[2] <= end], key=lambda w: w[2]):
            self.clock = max(self.clock, write[2] - 1e-3)
            self._expire()
            self._expire()
            self.kv_wire.remove(write)
            self._land(write[0], write[1], True)
        self.clock = end
        self._expire()

    # aborts and loss ------------------------------------------------------------------------------------------
    @rule(on_prefill=st.booleans(), i=st.integers(0, 99))
    def abort(self, on_prefill: bool, i: int) -> None:
        side = self.prefill if on_prefill else self.decode
        live = sorted(side.requests.live)
        if not live:
            return
        req = side.requests.get(live[i % len(live)])
        if self.FENCE and req.state is State.RESERVED:  # a write may still land: DecodeWorker.abort fences
            side.requests.fence(req, TransferState.CANCELLED, "aborted", "abort", self.FENCE)
            return
        if on_prefill and self.FENCE and req.destination is not None:
            self.notices.append((req.request_id, req.state is not State.TRANSFERRING))
        before = req.state
        side.abort(req.request_id)
        assert req.state is (State.FENCED if before is State.FENCED else State.ABORTED)

    @rule(prefill_lost=st.booleans())
    def instance_lost(self, prefill_lost: bool) -> None:
        """One side dies (its table with it); the router aborts the other side's share of their requests."""
        lost, other = (self.prefill, self.decode) if prefill_lost else (self.decode, self.prefill)
        for rid in [r for r in other.requests.live if r.startswith("pd") and r in lost.requests.live]:
            req = other.requests.get(rid)
            if self.FENCE and req.state is State.RESERVED:
                other.requests.fence(req, TransferState.CANCELLED, "aborted", "abort", self.FENCE)
            else:
                other.abort(rid)
        fresh = new_side(prefill_lost, lost.allocator.num_blocks)
        self.records[id(fresh)] = []
        if prefill_lost:
            self.prefill = fresh
        else:
            self.decode = fresh
        self.kv_wire.clear()  # a dead sender writes no more; writes to a dead receiver fail
        self.answers.clear()
        self.notices.clear()

    # the properties ---------------------------------------------------------------------------------------------
    @invariant()
    def nothing_ended_holds_anything_and_counters_add_up(self) -> None:
        for side in (self.prefill, self.decode):
            mine = self.records[id(side)]
            ended = [r for r in mine if r.state.final]
            side.requests.check(ended)  # holdings by state, pages, batch, queue, state counts
            assert {r.request_id for r in mine if not r.state.final} == set(side.requests.live)
            assert side.requests.aborted == sum(r.state is State.ABORTED for r in ended)
        ended_transfers = [r for r in self.records[id(self.prefill)]
                           if r.request_id in self.shipped and r.state.final]
        assert sum(self.prefill.requests.transfers.values()) == len(ended_transfers)
        assert self.FENCE or self.decode.requests.count(State.FENCED) == 0


class FencedRankLifecycle(RankLifecycle):
    """NIXL: prefill writes one-sided into the reserved pages, so a reservation that ends without its KV is
    FENCED until a notice proves the write ended or the fence passes. Writes land at any time up to their
    bound, and every byte must land in pages its own request still holds."""

    FENCE = 3.0


def test_a_late_write_finds_its_pages_still_fenced():
    """The sequence the fence exists for, spelled out: the reservation times out while its write is on the
    wire; the write lands at its bound, after the decode rank fenced the pages and polled again."""
    machine = FencedRankLifecycle()
    machine.arrive_pd(prompt=5, max_new=3)
    machine.step_prefill()  # prefilled and shipped at once: the write may land until TIMEOUT + FENCE / 2
    machine.time_passes(TIMEOUT + 0.5)
    assert machine.decode.requests.in_state(State.FENCED)[0].request_id == "pd1"
    machine.time_passes(1.0)  # lands into pages pd1 still holds (asserted in _land), which proves it ended
    assert not machine.decode.requests.live and machine.decode.allocator.num_used == 0
    machine.nothing_ended_holds_anything_and_counters_add_up()


TestRankLifecycle = RankLifecycle.TestCase
TestRankLifecycle.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestFencedRankLifecycle = FencedRankLifecycle.TestCase
TestFencedRankLifecycle.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
