"""Every request a rank holds, in one table: ask it where a request is and what it holds.

The table owns the records (moe_pd.engine.core.request.Request), the waiting queue and the running batch,
and the counters a rank reports. `transition` is the only way a request changes state: it checks the move
against NEXT, releases what the new state no longer holds (HOLDS: pages back to the allocator, the batch
slot, the queue place, the transfer entry), enters the new state's structures, and forgets a request that
ended. The scheduler decides who runs and allocates pages; the workers move KV; neither keeps a dict of
its own about a request.
"""

from __future__ import annotations

import time
from collections import Counter, deque

from moe_pd.engine.core.request import (
    HOLDS,
    NEXT,
    InvalidRequest,
    Request,
    State,
    capacity_problem,
    prompt_problem,
)
from moe_pd.kvcache.block_manager import BlockManager
from moe_pd.kvcache.transfer.base import Transfer, TransferState

_ENDED_TRANSFER = {State.FINISHED: TransferState.DONE, State.DECODING: TransferState.DONE,
                   State.ABORTED: TransferState.CANCELLED}


class IllegalTransition(RuntimeError):
    """A move NEXT does not allow: a bug in whoever asked for it."""


class RequestTable:
    def __init__(self, allocator: BlockManager, max_context: int, vocab_size: int | None = None,
                 lookahead: int = 0) -> None:
        """`lookahead`: positions a speculative step writes past a request's last token (2K - 1)."""
        self.allocator, self.max_context, self.vocab_size = allocator, max_context, vocab_size
        self.lookahead = lookahead
        self.live: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        """QUEUED requests in admission order (preempted ones at the front)."""
        self.running: list[Request] = []
        """PREFILLING and DECODING requests: the batch."""
        self.promoting: list[Request] = []
        """PROMOTING requests in admission order: their prefixes are on their way up from the KV tiers."""
        self.draining: list[tuple[object, list[int]]] = []
        """(promotion, pages) of requests that ended while their promotion still copied into their pages:
        the pages go back to the allocator once the copies ended (`settle`), never before."""
        self.by_state: Counter[State] = Counter()
        self.cached_tokens = 0
        """Prompt tokens served from a cache so far (the device's prefix cache and the KV tiers)."""
        self.cached_by_source: Counter[str] = Counter()
        """The same, by where the pages came from: device, dram, disk."""
        self.aborted = 0
        """Requests aborted so far (a client went away, or the router gave up on them)."""
        self.transfers: Counter[str] = Counter()
        """Prefill side: KV transfers ended so far, by final state (done, rejected, timed_out, cancelled)."""

    # asking -----------------------------------------------------------------------------------------------
    def get(self, request_id: str) -> Request | None:
        return self.live.get(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.live

    def __len__(self) -> int:
        return len(self.live)

    def count(self, *states: State) -> int:
        return sum(self.by_state[s] for s in states)

    def in_state(self, state: State) -> list[Request]:
        return [r for r in self.live.values() if r.state is state]

    def describe(self, request_id: str) -> dict | None:
        """Where the request is and what it holds (None: not on this rank)."""
        req = self.live.get(request_id)
        if req is None:
            return None
        transfer = req.transfer
        return {"state": req.state.value, "pages": list(req.block_table), "slot": req in self.running,
                "queued": req.state is State.QUEUED, "promoting": req.promotion is not None,
                "tokens": req.num_tokens, "computed": req.num_computed,
                "transfer": None if transfer is None else {
                    "address": transfer.address, "state": transfer.state.value,
                    "deadline_in_s": transfer.deadline - time.monotonic(),
                    "reclaim_in_s": None if transfer.reclaim_at is None else transfer.reclaim_at - time.monotonic()}}

    # entering ---------------------------------------------------------------------------------------------
    def _check_new(self, req: Request) -> None:
        if req.request_id in self.live:
            raise InvalidRequest(f"request {req.request_id} is already here")
        if problem := prompt_problem(req.prompt_ids, self.vocab_size, self.max_context):
            raise InvalidRequest(f"request {req.request_id}: the prompt {problem}")
        if problem := capacity_problem(len(req.prompt_ids), req.max_new_tokens, self.allocator.block_size,
                                       self.max_context, self.allocator.num_blocks, self.lookahead):
            raise InvalidRequest(f"request {req.request_id} {problem}")
        req.max_new_tokens = min(req.max_new_tokens, self.max_context - len(req.prompt_ids))

    def add(self, req: Request) -> Request:
        """A new request, QUEUED at the back (raises InvalidRequest for one that can never run)."""
        self._check_new(req)
        req.state = State.QUEUED
        self._enter(req)
        self.waiting.append(req)
        return req

    def reserve(self, req: Request, transfer: Transfer) -> list[int]:
        """Decode side: pages for a prompt prefilled elsewhere (and its first token), RESERVED until its KV
        arrives. Returns the pages the prompt's latents go to. Raises OutOfBlocks when they do not fit."""
        self._check_new(req)
        computed = len(req.prompt_ids)
        table: list[int] = []
        self.allocator.grow(table, computed + 1 + self.lookahead)
        req.block_table, req.num_computed, req.state, req.transfer = table, computed, State.RESERVED, transfer
        self._enter(req)
        return self.prompt_pages(req)

    def prompt_pages(self, req: Request) -> list[int]:
        return req.block_table[: self.allocator.blocks_for(len(req.prompt_ids))]

    def _enter(self, req: Request) -> None:
        self.live[req.request_id] = req
        self.by_state[req.state] += 1

    # moving -----------------------------------------------------------------------------------------------
    def transition(self, req: Request, to: State, reason: str | None = None) -> None:
        """Moves `req` to `to`: releases what `to` does not hold, enters what it does; a final state forgets
        the request. `reason` is its finish reason."""
        if to not in NEXT[req.state] or self.live.get(req.request_id) is not req:
            raise IllegalTransition(f"request {req.request_id}: {req.state.value} -> {to.value}")
        before, after = HOLDS[req.state], HOLDS[to]
        if "queue" in before - after:
            if self.waiting and self.waiting[0] is req:
                self.waiting.popleft()
            else:
                self.waiting.remove(req)
        if "slot" in before - after:
            self.running.remove(req)
        if "promotion" in before - after:
            self._end_promotion(req, "pages" in before - after)
        if "pages" in before - after:
            self.allocator.free(req.block_table)
        if "transfer" in before - after:
            self._end_transfer(req, to)
        self.by_state[req.state] -= 1
        from_running = "slot" in before
        req.state = to
        self.by_state[to] += 1
        if reason is not None:
            req.finish_reason = reason
        if "slot" in after - before:
            self.running.append(req)
        if "promotion" in after - before:
            self.promoting.append(req)
        if "queue" in after - before:  # preempted: first in line again
            (self.waiting.appendleft if from_running else self.waiting.append)(req)
        if to.final:
            self.by_state[to] -= 1
            del self.live[req.request_id]
            self.aborted += to is State.ABORTED

    def _end_promotion(self, req: Request, pages_released: bool) -> None:
        self.promoting.remove(req)
        promotion, req.promotion = req.promotion, None
        if pages_released and not promotion.ready():  # the tier thread may still write into its pages
            self.draining.append((promotion, req.block_table))
            req.block_table = []
        else:
            promotion.wait()  # ended: releases its leases on the tier slots

    def settle(self) -> None:
        """Frees the pages of ended requests whose promotions have finished copying since."""
        still = []
        for promotion, pages in self.draining:
            if promotion.ready():
                promotion.wait()
                self.allocator.free(pages)
            else:
                still.append((promotion, pages))
        self.draining = still

    def _end_transfer(self, req: Request, to: State) -> None:
        transfer, req.transfer = req.transfer, None
        transfer.finish(_ENDED_TRANSFER.get(to, TransferState.FAILED), "aborted" if to is State.ABORTED else "")
        if req.destination is not None:  # the sending side counts its transfers by final state
            self.transfers[transfer.state.value] += 1

    def fence(self, req: Request, state: TransferState, detail: str, reason: str, fence_s: float) -> None:
        """Decode side: a RESERVED request whose KV will not come (`state`: why) but into whose pages a write
        may still land: FENCED, holding its pages until `reclaim` or its deadline plus `fence_s`. `reason`
        is its finish reason ("abort" ends it ABORTED)."""
        req.transfer.finish(state, detail)
        req.transfer.reclaim_at = req.transfer.deadline + fence_s
        self.transition(req, State.FENCED, reason)

    def reclaim(self, req: Request) -> None:
        """A FENCED request's pages are safe to reuse: it ends (ABORTED if it was aborted, else FAILED)."""
        self.transition(req, State.ABORTED if req.finish_reason == "abort" else State.FAILED)

    def expired(self, now: float | None = None, fence_s: float = 0.0) -> list[tuple[Request, Transfer]]:
        """Requests whose transfer deadline passed, with their transfer entries (TIMED_OUT): each is FAILED
        here, or FENCED when `fence_s` > 0 (a decode rank on a backend whose writes may land late). FENCED
        requests whose fence ended are reclaimed (and not returned: they were reported when fenced)."""
        now = time.monotonic() if now is None else now
        out = []
        for req in [r for r in self.live.values() if r.transfer is not None]:
            transfer = req.transfer
            if req.state is State.FENCED:
                if now >= transfer.reclaim_at:
                    self.reclaim(req)
                continue
            if now <= transfer.deadline:
                continue
            side = "an answer from the decode rank" if req.destination is not None else "KV"
            reason = f"error: KV transfer timed_out: no {side} before the deadline"
            if fence_s > 0 and req.state is State.RESERVED:
                self.fence(req, TransferState.TIMED_OUT, f"no {side} before the deadline", reason, fence_s)
            else:
                transfer.finish(TransferState.TIMED_OUT, f"no {side} before the deadline")
                self.transition(req, State.FAILED, reason)
            out.append((req, transfer))
        return out

    # checking ---------------------------------------------------------------------------------------------
    def check(self, ended: list[Request] = ()) -> None:
        """Every invariant of the table (tests call it after every event): what each live request holds is
        what its state holds, nothing in `ended` (requests that left) holds anything, and the counters equal
        the sums over live requests (pages referenced, batch, queue, states)."""
        counted = Counter(r.state for r in self.live.values())
        assert +self.by_state == counted, (self.by_state, counted)
        assert {id(r) for r in self.running} == {id(r) for r in self.live.values() if "slot" in HOLDS[r.state]}
        assert [r for r in self.waiting] == [r for r in self.waiting if r.state is State.QUEUED]
        # as a set: a request preempted after its promotion comes back to PROMOTING behind later arrivals
        promoting = sorted(id(r) for r in self.live.values() if r.state is State.PROMOTING)
        assert sorted(map(id, self.promoting)) == promoting
        assert len(self.waiting) == counted[State.QUEUED] and len(self.running) == len(set(map(id, self.running)))
        for rid, req in self.live.items():
            holds = HOLDS[req.state]
            assert rid == req.request_id and not req.state.final, req
            assert bool(req.block_table) == ("pages" in holds), (req.state, req.block_table)
            assert (req.transfer is not None) == ("transfer" in holds), (req.state, req.transfer)
            if req.state is State.FENCED:
                assert req.transfer.state.final and req.transfer.reclaim_at is not None, req.transfer
            assert (req.promotion is not None) == ("promotion" in holds), (req.state, req.promotion)
        for req in ended:
            assert req.state.final and self.live.get(req.request_id) is not req, req
            assert not req.block_table and req.transfer is None and all(r is not req for r in self.running), req
            assert req.promotion is None and all(r is not req for r in self.promoting), req
            assert all(r is not req for r in self.waiting), req
        refs = Counter(p for r in self.live.values() for p in r.block_table)
        draining = [p for _, pages in self.draining for p in pages]
        assert not set(draining) & set(refs), "a page a promotion still copies into was handed out again"
        refs.update(draining)
        for page, count in refs.items():
            assert self.allocator.pages[page].ref_count == count, (page, count)
        assert self.allocator.num_used == len(refs), (self.allocator.num_used, len(refs))
