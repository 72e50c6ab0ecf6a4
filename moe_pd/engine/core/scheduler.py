"""Continuous batching with chunked prefill, a token budget per step, prefix caching and preemption.

Each step: running sequences first (decodes take one token; an unfinished prefill takes its next chunk),
then waiting sequences in arrival order, each admitted with its cached prefix and a first chunk, until the
step's token budget or the sequence limit is reached. When a running sequence needs a page and none is
free, the latest-arrived running sequence is preempted: its pages are released and it goes back to the
front of the queue to be recomputed from its tokens (prompt and output so far), never truncated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moe_pd.engine.core.request import InvalidRequest
from moe_pd.engine.core.sequence import Sequence, Status
from moe_pd.kvcache.block_manager import BlockManager, OutOfBlocks


@dataclass
class Scheduled:
    seq: Sequence
    context: int
    """Tokens already in the cache before this step."""
    num_new: int
    """Tokens computed this step."""

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's end, so this step samples its next token."""
        return self.context + self.num_new == self.seq.num_tokens


@dataclass
class StepPlan:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    rejected: list[Sequence] = field(default_factory=list)
    """Sequences that can never fit the cache; finished with an error."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, allocator: BlockManager, max_num_seqs: int, token_budget: int,
                 max_context: int, hold_finished_pages: bool = False) -> None:
        """`hold_finished_pages`: a finished sequence keeps its pages until `release` (a prefill instance
        holds them until its KV has been shipped to decode)."""
        if max_num_seqs <= 0 or token_budget <= 0:
            raise ValueError("max_num_seqs and token_budget must be > 0")
        self.allocator, self.max_num_seqs, self.token_budget = allocator, max_num_seqs, token_budget
        self.max_context, self.hold_finished_pages = max_context, hold_finished_pages
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []
        """Sequences that ended since the owner last called `take_finished` (a server must drain it)."""
        self.cached_tokens = 0
        """Prompt tokens served from the prefix cache so far."""
        self.aborted = 0
        """Requests aborted so far (a client went away, or the router gave up on them)."""
        self.receiving: dict[str, Sequence] = {}
        """Decode side: sequences whose pages are reserved while their prefilled KV is in transit."""

    # requests ---------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if len(seq.prompt_ids) >= self.max_context:
            raise InvalidRequest(f"request {seq.request_id}: prompt of {len(seq.prompt_ids)} tokens does not fit the "
                             f"context of {self.max_context}")
        seq.max_new_tokens = min(seq.max_new_tokens, self.max_context - len(seq.prompt_ids))
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Removes the request wherever it is (running, queued, or receiving its KV) and releases its pages."""
        if request_id in self.receiving:
            self.aborted += 1
            return self.drop_receiving(request_id, "abort", Status.ABORTED)
        for queue in (self.running, self.waiting):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.allocator.free(seq.block_table)
                    seq.status, seq.finish_reason = Status.ABORTED, "abort"
                    self.finished.append(seq)
                    self.aborted += 1
                    return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.receiving)

    def take_finished(self) -> list[Sequence]:
        """The sequences that ended since the last call; the scheduler forgets them."""
        out, self.finished = self.finished, []
        return out

    # planning ---------------------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.num_computed, seq.status = 0, Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.token_budget
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq not in self.running:  # preempted by an earlier sequence of this loop
                continue
            num_new = min(seq.num_uncomputed, budget)
            while not self.allocator.can_grow(seq.block_table, seq.num_computed + num_new):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.allocator.grow(seq.block_table, seq.num_computed + num_new)
            plan.scheduled.append(Scheduled(seq, seq.num_computed, num_new))
            budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.token_ids
            hits = self.allocator.cached_prefix(tokens)
            hit_tokens = len(hits) * self.allocator.block_size
            num_new = min(len(tokens) - hit_tokens, budget)
            try:
                table, hit_tokens = self.allocator.admit(tokens, hit_tokens + num_new, hits)
            except OutOfBlocks:
                if self.running or plan.scheduled or self.allocator.num_used:
                    break  # wait for pages to come back
                self.waiting.popleft()
                seq.status, seq.finish_reason = Status.FINISHED, "error: the request needs more KV pages than exist"
                self.finished.append(seq)
                plan.rejected.append(seq)
                continue
            self.waiting.popleft()
            seq.block_table, seq.num_computed, seq.num_cached_hit = table, hit_tokens, hit_tokens
            self.cached_tokens += hit_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.scheduled.append(Scheduled(seq, hit_tokens, num_new))
            budget -= num_new
        return plan

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Applies a step's results: `sampled` maps request id -> token for every sequence whose chunk
        reached its end. Returns the sequences that finished this step (their pages are released)."""
        done = []
        for item in plan.scheduled:
            seq = item.seq
            if seq.status is not Status.RUNNING:
                continue
            seq.num_computed = item.context + item.num_new
            if seq.num_computed // self.allocator.block_size > item.context // self.allocator.block_size:
                self.allocator.commit(seq.block_table, seq.token_ids, seq.num_computed)  # a page filled up
            if item.samples:
                self._append(seq, sampled[seq.request_id])
            if seq.finished:
                done.append(seq)
        return done

    def _append(self, seq: Sequence, token: int) -> None:
        """Records a running sequence's next token; a sequence that finishes leaves the batch."""
        seq.append_token(token)
        if seq.num_tokens >= self.max_context and not seq.finished:
            seq.status, seq.finish_reason = Status.FINISHED, "length"
        if seq.finished:
            self.running.remove(seq)
            if not self.hold_finished_pages:
                self.allocator.free(seq.block_table)
            self.finished.append(seq)

    def release(self, seq: Sequence) -> None:
        """Frees the pages a finished sequence kept (hold_finished_pages)."""
        self.allocator.free(seq.block_table)

    # decode side of disaggregation ---------------------------------------------------------------------------
    def reserve_prefilled(self, seq: Sequence) -> list[int]:
        """Reserves pages for a sequence whose prompt was prefilled elsewhere (its first token is already in
        `output_ids`); it waits in `receiving` until `activate`. Raises OutOfBlocks when they do not fit."""
        computed = len(seq.prompt_ids)
        table: list[int] = []
        self.allocator.grow(table, computed + 1)
        seq.block_table, seq.num_computed, seq.status = table, computed, Status.WAITING
        self.receiving[seq.request_id] = seq
        return table[: -(-computed // self.allocator.block_size)]

    def activate(self, request_id: str, first_token: int) -> Sequence:
        """The KV arrived: the sequence joins the running batch with prefill's first token and decodes
        from it (or finishes at once if that token ends it)."""
        seq = self.receiving.pop(request_id)
        seq.status = Status.RUNNING
        self.running.append(seq)
        self._append(seq, first_token)
        return seq

    def drop_receiving(self, request_id: str, reason: str, status: Status = Status.FINISHED) -> Sequence | None:
        """The transfer failed, timed out or the request was aborted: free the reserved pages and end it."""
        seq = self.receiving.pop(request_id, None)
        if seq is not None:
            self.allocator.free(seq.block_table)
            seq.status, seq.finish_reason = status, reason
            self.finished.append(seq)
        return seq
