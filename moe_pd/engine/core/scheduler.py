"""Continuous batching with chunked prefill, a token budget per step, prefix caching and preemption.

Each step: running requests first (decodes take one token; an unfinished prefill takes its next chunk),
then waiting requests in arrival order, each admitted with its cached prefix and a first chunk, until the
step's token budget or the request limit is reached. When a running request needs a page and none is
free, the latest-arrived running request is preempted: its pages are released and it goes back to the
front of the queue to be recomputed from its tokens (prompt and output so far), never truncated.

Speculative decoding (num_draft_tokens = K > 0): a decoding request with drafts verifies its last token and
its K drafts in one step (budget 1 + K) and keeps pages for 2K - 1 positions past its last token (the
furthest a step writes); after the step it appends the accepted tokens (stopping at a stop token or its
length) and releases the pages past that lookahead (BlockManager.truncate: the rejected positions' rows are
never read).

With KV tiers below the device pages (`tiers`: a moe_pd.kvcache.tiers.manager.TierManager), a waiting
request whose prefix continues in host DRAM or on disk is admitted with pages for that run too, as long as
loading it is cheaper than recomputing it (moe_pd.engine.core.tier_cost): it is PROMOTING while the tier
thread copies the pages up and the step's other work runs, and joins the batch in the first step that finds
its copies done (pages that did not arrive intact are recomputed). A step with nothing else to run waits
for the oldest promotion instead of spinning.

Decisions only: the requests, their states and what they hold are the RequestTable's (`self.requests`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_pd.engine.core.request import Request, State
from moe_pd.engine.core.table import RequestTable
from moe_pd.engine.core.tier_cost import LoadOrCompute
from moe_pd.kvcache.block_manager import BlockManager, OutOfBlocks
from moe_pd.kvcache.transfer.base import Transfer


@dataclass
class Scheduled:
    seq: Request
    context: int
    """Tokens already in the cache before this step."""
    num_new: int
    """Tokens computed this step."""
    drafts: int = 0
    """Draft tokens verified after them (speculative decoding; the request's `drafts`)."""

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's end, so this step samples its next token."""
        return self.context + self.num_new == self.seq.num_tokens


@dataclass
class StepPlan:
    scheduled: list[Scheduled] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def num_positions(self) -> int:
        """Rows the step's forwards run at most: its tokens and the drafts it verifies."""
        return sum(s.num_new + s.drafts for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, allocator: BlockManager, max_num_seqs: int, token_budget: int, max_context: int,
                 hold_finished_pages: bool = False, vocab_size: int | None = None, tiers: Any = None,
                 num_draft_tokens: int = 0) -> None:
        """`hold_finished_pages`: a request that finished generating keeps its pages as PREFILLED (a prefill
        instance ships its KV to decode first). `vocab_size`: prompts are checked against it. `tiers`: the KV
        tiers below the device pages (lookup, promote), or None. `num_draft_tokens`: K of speculative decoding
        (0: off)."""
        if max_num_seqs <= 0 or token_budget <= 0:
            raise ValueError("max_num_seqs and token_budget must be > 0")
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 0")
        self.allocator, self.max_num_seqs, self.token_budget = allocator, max_num_seqs, token_budget
        self.max_context, self.hold_finished_pages = max_context, hold_finished_pages
        self.num_draft_tokens = num_draft_tokens
        self.lookahead = 2 * num_draft_tokens - 1 if num_draft_tokens else 0
        """Positions past a request's last token that its pages cover while it decodes speculatively."""
        self.requests = RequestTable(allocator, max_context, vocab_size, self.lookahead)
        self.tiers = tiers if tiers is not None and allocator.tier_root is not None else None
        self.cost = LoadOrCompute()
        self.write_back = False
        """kvcache.tier_write_policy=write_back: evicted pages are offered to the tiers (by the engine before
        each forward, and here before a promotion may write into them)."""

    @property
    def waiting(self):
        return self.requests.waiting

    @property
    def running(self) -> list[Request]:
        return self.requests.running

    # requests ---------------------------------------------------------------------------------------------
    def add(self, req: Request) -> Request:
        return self.requests.add(req)

    def abort(self, request_id: str) -> Request | None:
        """Ends the request wherever it is and releases what it holds; None when it is not here. A FENCED
        request has ended already: its pages come back when its fence ends."""
        req = self.requests.get(request_id)
        if req is not None and req.state is not State.FENCED:
            self.requests.transition(req, State.ABORTED, "abort")
        return req

    @property
    def has_work(self) -> bool:
        """Requests to run, or to hear about (KV on the wire either way)."""
        return bool(self.requests.live)

    @property
    def has_runnable(self) -> bool:
        """Requests this rank's next step runs or waits for (queued, promoting, in the batch)."""
        return bool(self.requests.running or self.requests.waiting or self.requests.promoting)

    # planning ---------------------------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.requests.transition(req, State.QUEUED)
        req.num_computed = 0
        req.num_preemptions += 1
        req.drafts, req.draft_probs = [], None  # its recompute drafts anew

    def schedule(self) -> StepPlan:
        self._collect_promotions()
        plan = self._plan()
        if plan.is_empty and self.requests.promoting:  # nothing else to do: wait for the oldest one
            self.requests.promoting[0].promotion.wait()
            self._collect_promotions()
            plan = self._plan()
        return plan

    def _plan(self) -> StepPlan:
        plan, budget = StepPlan(), self.token_budget
        for req in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if req.state is State.QUEUED:  # preempted by an earlier request of this loop
                continue
            num_new = min(req.num_uncomputed, budget)
            drafts = self.num_draft_tokens if self._verifies(req, budget) else 0
            reaches_end = req.num_computed + num_new == req.num_tokens  # it samples, then drafts from there
            need = req.num_computed + num_new + (self.lookahead if reaches_end else 0)
            while not self.allocator.can_grow(req.block_table, need):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is req:
                    break
            if req.state is State.QUEUED:
                continue
            self.allocator.grow(req.block_table, need)
            plan.scheduled.append(Scheduled(req, req.num_computed, num_new, drafts))
            budget -= num_new + drafts
        bs = self.allocator.block_size
        while self.waiting and budget > 0 and len(self.running) + len(self.requests.promoting) < self.max_num_seqs:
            req = self.waiting[0]
            tokens = req.token_ids
            exact = req.prompt_logprobs is None  # prompt logprobs need every prompt token computed
            hits = self.allocator.cached_prefix(tokens) if exact else []
            hit_tokens = len(hits) * bs
            found = self._tier_hits(tokens, hits) if exact else []
            num_new = 0 if found else min(len(tokens) - hit_tokens, budget)
            upto = hit_tokens + len(found) * bs + num_new
            extra = self.lookahead if upto == len(tokens) else 0  # it samples and drafts
            try:
                table, hit_tokens = self.allocator.admit(tokens, upto + extra, hits)
            except OutOfBlocks:
                break  # wait for pages to come back (every request fits the whole cache: RequestTable.add)
            req.block_table, req.num_computed, req.num_cached_hit = table, hit_tokens, hit_tokens
            self.requests.cached_tokens += hit_tokens
            self.requests.cached_by_source["device"] += hit_tokens
            if found:
                if self.write_back:  # pages this admission evicted are copied out before anything lands in them
                    self.tiers.offer(self.allocator.take_evicted())
                req.promotion = self.tiers.promote([(table[len(hits) + i], e) for i, (_, e) in enumerate(found)])
                self.requests.transition(req, State.PROMOTING)
                continue
            self.requests.transition(req, State.PREFILLING)
            plan.scheduled.append(Scheduled(req, hit_tokens, num_new))
            budget -= num_new
        return plan

    # KV tiers -----------------------------------------------------------------------------------------------
    def _tier_hits(self, tokens: list[int], hits: list[int]) -> list[tuple[str, Any]]:
        """(tier, entry) of the pages after the device hits worth promoting (none: recompute them)."""
        if self.tiers is None:
            return []
        found = self.tiers.lookup(self.allocator.tier_entries(tokens, hits))
        return found[: self.cost.pages_worth_loading([tier for tier, _ in found], self.allocator.block_size)]

    def _collect_promotions(self) -> None:
        """PROMOTING requests whose copies ended join the batch with the pages that arrived intact."""
        self.requests.settle()
        for req in [r for r in self.requests.promoting if r.promotion.ready()]:
            promotion = req.promotion
            arrived = promotion.wait()
            self.cost.observe_load(promotion.sources, promotion.seconds)
            bs = self.allocator.block_size
            upto = req.num_computed + arrived * bs
            self.allocator.commit(req.block_table, req.token_ids, upto, offer=False)  # the tiers have them
            for tier in promotion.sources[:arrived]:
                self.requests.cached_by_source[tier] += bs
            self.requests.cached_tokens += upto - req.num_computed
            req.num_computed = req.num_cached_hit = upto
            self.requests.transition(req, State.PREFILLING)

    def _verifies(self, req: Request, budget: int) -> bool:
        """Whether `req` verifies its drafts this step: it decodes, has K drafts and the budget has room. A
        request with penalties or logprobs decodes one token a step (its target at each drafted position
        depends on the tokens before it; its logprobs come from the plain sampler)."""
        return (self.num_draft_tokens > 0 and req.state is State.DECODING and req.num_uncomputed == 1
                and len(req.drafts) == self.num_draft_tokens and budget >= 1 + self.num_draft_tokens
                and not req.params.penalized and req.logprobs is None)

    def update(self, plan: StepPlan, sampled: dict[str, int | list[int]],
               failed: dict[str, str] | None = None) -> None:
        """Applies a step's results: `sampled` maps request id -> token (or, for a verification, the tokens
        it emits: accepted drafts then one of the target's) for every request whose chunk reached its end,
        except those in `failed` (request id -> why): no token could be sampled for them (non-finite
        logits), so they end FAILED alone and release what they hold."""
        for rid, why in (failed or {}).items():
            req = self.requests.get(rid)
            if req is not None and req.state in (State.PREFILLING, State.DECODING):
                self.requests.transition(req, State.FAILED, f"error: {why}")
        for item in plan.scheduled:
            req = item.seq
            if req.state not in (State.PREFILLING, State.DECODING):
                continue  # aborted or preempted meanwhile
            tokens = sampled.get(req.request_id) if item.samples else None
            tokens = [tokens] if isinstance(tokens, int) else tokens
            kept, reason = req.next_tokens(tokens, self.max_context) if item.drafts else (item.num_new, None)
            req.num_computed = item.context + kept  # a verification's last kept token is computed next step
            if req.num_computed // self.allocator.block_size > item.context // self.allocator.block_size:
                self.allocator.commit(req.block_table, req.token_ids, req.num_computed)  # a page filled up
            if item.drafts:
                self._finish_or_truncate(req, reason)
            elif item.samples:
                self._next_token(req, tokens[0])

    def _finish_or_truncate(self, req: Request, reason: str | None) -> None:
        """After a verification: the request ends, or releases the pages past its lookahead (the rejected
        positions' rows are never read)."""
        if reason is not None:
            self.requests.transition(req, State.PREFILLED if self.hold_finished_pages else State.FINISHED, reason)
        else:
            self.allocator.truncate(req.block_table, req.num_tokens + self.lookahead)

    def _next_token(self, req: Request, token: int) -> None:
        """Records a running request's next token: it decodes on, or finishes (PREFILLED when its pages are
        held for shipping)."""
        reason = req.next_token(token, self.max_context)
        if reason is None:
            if req.state is State.PREFILLING:
                self.requests.transition(req, State.DECODING)
        else:
            self.requests.transition(req, State.PREFILLED if self.hold_finished_pages else State.FINISHED, reason)

    # decode side of disaggregation ---------------------------------------------------------------------------
    def reserve(self, req: Request, transfer: Transfer) -> list[int]:
        """Pages for a request whose prompt is prefilled elsewhere (RESERVED until its KV arrives); returns
        the pages its prompt's latents go to. Raises OutOfBlocks when they do not fit."""
        return self.requests.reserve(req, transfer)

    def activate(self, req: Request, first_token: int) -> None:
        """Its KV arrived: it joins the batch with prefill's first token and decodes from it (or finishes at
        once if that token ends it)."""
        self.requests.transition(req, State.DECODING)
        reason = req.next_token(first_token, self.max_context)
        if reason is not None:
            self.requests.transition(req, State.FINISHED, reason)
