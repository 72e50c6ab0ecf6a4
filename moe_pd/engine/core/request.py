"""A request on a rank: its record and the states it goes through, plain Python (no torch).

    colocated:  QUEUED -> PREFILLING -> DECODING -> FINISHED
    tier hit:   QUEUED -> PROMOTING (its prefix copied up from the host DRAM / disk tiers) -> PREFILLING
    prefill:    QUEUED -> PREFILLING -> PREFILLED -> TRANSFERRING -> FINISHED (decode stored the KV)
    decode:     RESERVED -> DECODING -> FINISHED
                RESERVED -> FENCED -> FAILED | ABORTED (no KV, but a write may still land: pages kept until the fence)
    preemption: PREFILLING | DECODING -> QUEUED (pages dropped; recomputed from its tokens)
    any live state -> ABORTED (the client or the router gave up) | FAILED (it can never run, its KV never came,
                or a step failed for it alone: no finite logits)

HOLDS says what a request holds in each state (pages, a batch slot, a place in the queue, a transfer entry),
NEXT which states may follow; moe_pd.engine.core.table.RequestTable owns the records and its `transition`
is the one place that releases what the next state no longer holds. A new state (waiting for KV from a
cache tier, promoting, drafting, migrating) is an entry in State, HOLDS and NEXT, plus a releaser there if it
holds a new kind of resource.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from moe_pd.kvcache.transfer.base import KVTarget, Transfer

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by a tinier one overflows
them to inf, and the sampler would draw from NaN probabilities."""
MAX_LOGPROBS = 20
"""Most alternatives a token's logprobs may list (OpenAI's limit for top_logprobs)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output already holds (OpenAI's presence_penalty)."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence in the output so far (OpenAI's frequency_penalty)."""
    logprobs: int | None = None
    """Each generated token's log-probability with this many alternatives (0: the token's only); None: none."""
    prompt_logprobs: int | None = None
    """The same for every prompt token (echo with logprobs); such a request computes its whole prompt (no
    prefix-cache hits), as the cached positions' logits were never computed."""

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model (raw logits, before penalties and temperature) and the
    `top` most likely tokens at its position as (token id, log-probability), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class InvalidRequest(ValueError):
    """A request that can never run as asked (its prompt, its length, its size): it fails alone, as the
    client's error (HTTP 400), never as the server's."""


def prompt_problem(prompt_ids: list[int], vocab_size: int | None, max_context: int) -> str | None:
    """What is wrong with a prompt, as the end of a sentence starting 'the prompt' (or None). The one prompt
    check: the engine, offline generation and the HTTP front all use it."""
    if not prompt_ids:
        return "is empty"
    if vocab_size is not None:
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        if bad:
            return f"has token ids outside [0, {vocab_size}): {bad[:5]}"
    if len(prompt_ids) >= max_context:
        return (f"has {len(prompt_ids)} tokens and does not fit the context of {max_context} "
                "(model.max_position_embeddings), leaving no room to generate")
    return None


def pages_needed(prompt_len: int, max_new_tokens: int, block_size: int, max_context: int,
                 lookahead: int = 0) -> int:
    """KV pages a request holds at its longest (prompt plus output, capped at the context), plus the
    `lookahead` positions a speculative step writes past its last token."""
    return -(-(min(prompt_len + max_new_tokens, max_context) + lookahead) // block_size)


def capacity_problem(prompt_len: int, max_new_tokens: int, block_size: int, max_context: int,
                     num_pages: int, lookahead: int = 0) -> str | None:
    """Why a request can never fit a cache of `num_pages` pages (or None): the one fits-in-cache check."""
    need = pages_needed(prompt_len, max_new_tokens, block_size, max_context, lookahead)
    return f"needs {need} KV pages, the cache has {num_pages}" if need > num_pages else None


class State(enum.Enum):
    QUEUED = "queued"
    """Waiting for admission (new, or preempted and waiting to recompute)."""
    PROMOTING = "promoting"
    """Admitted with a prefix found in the KV tiers below the device: its pages are being copied up while
    the step's other work runs; it joins the batch (PREFILLING) once the copies ended."""
    PREFILLING = "prefilling"
    """Admitted: its prompt (or a recompute) runs in chunks."""
    DECODING = "decoding"
    """Generating one token per step."""
    PREFILLED = "prefilled"
    """Prefill instance: the first token is sampled; the prompt's KV waits to be shipped."""
    TRANSFERRING = "transferring"
    """Prefill instance: the KV is on its way to the decode rank; pages kept until it answers."""
    RESERVED = "reserved"
    """Decode instance: pages reserved for a prompt prefilled elsewhere; its KV is expected."""
    FENCED = "fenced"
    """Decode instance: the reservation ended without its KV (timed out, refused, aborted) and the router
    was told, but a write the sender gave up on may still land in its pages (a one-sided backend, NIXL): they
    stay held until a notice proves nothing writes into them, or until the fence ends (transfer.reclaim_at);
    then FAILED, or ABORTED if it was aborted."""
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({State.FINISHED, State.ABORTED, State.FAILED})
_ENDS = {State.ABORTED, State.FAILED}

HOLDS: dict[State, frozenset[str]] = {
    State.QUEUED: frozenset({"queue"}),
    State.PROMOTING: frozenset({"pages", "promotion"}),
    State.PREFILLING: frozenset({"pages", "slot"}),
    State.DECODING: frozenset({"pages", "slot"}),
    State.PREFILLED: frozenset({"pages"}),
    State.TRANSFERRING: frozenset({"pages", "transfer"}),
    State.RESERVED: frozenset({"pages", "transfer"}),
    State.FENCED: frozenset({"pages", "transfer"}),
    **{s: frozenset() for s in FINAL},
}
"""What a request holds in each state: "pages" (its block table), "slot" (a place in the running batch),
"queue" (a place in the waiting queue), "transfer" (its KV transfer entry, with a deadline), "promotion"
(copies from the KV tiers into its pages: the pages are reused only once the copies ended)."""

NEXT: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.PREFILLING, State.PROMOTING, *_ENDS}),
    State.PROMOTING: frozenset({State.PREFILLING, *_ENDS}),
    State.PREFILLING: frozenset({State.DECODING, State.PREFILLED, State.FINISHED, State.QUEUED, *_ENDS}),
    State.DECODING: frozenset({State.FINISHED, State.QUEUED, *_ENDS}),
    State.PREFILLED: frozenset({State.TRANSFERRING, *_ENDS}),
    State.TRANSFERRING: frozenset({State.FINISHED, *_ENDS}),
    State.RESERVED: frozenset({State.DECODING, State.FENCED, *_ENDS}),
    State.FENCED: frozenset(_ENDS),
    **{s: frozenset() for s in FINAL},
}

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One request on a rank: what it asked for, where it is, and everything it holds."""

    prompt_ids: list[int]
    max_new_tokens: int
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    eos_token_id: int | None = None
    ignore_eos: bool = False
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    arrival: int = field(default_factory=lambda: next(_ids))
    """Arrival order; the scheduler preempts the latest arrival first."""
    state: State = State.QUEUED
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    """The pages it holds."""
    num_computed: int = 0
    """Tokens whose latents are in the cache (prefix-cache hits count)."""
    num_cached_hit: int = 0
    """Prompt tokens served from a cache (the device's prefix cache or a KV tier) at the last admission."""
    promotion: Any = None
    """Its tier promotion while PROMOTING (a moe_pd.kvcache.tiers.manager.Promotion)."""
    num_preemptions: int = 0
    finish_reason: str | None = None
    """Why it stopped generating: stop, length, abort, or 'error: ...'."""
    generator: Any = None
    """The sampler's generator (a torch.Generator) for a sampled request; None for greedy."""
    destination: KVTarget | None = None
    """Prefill instance: where its KV goes (the decode rank's reservation)."""
    destination_expires: float = float("inf")
    """Prefill instance: when the decode rank's reservation ends, as this process reckons it (monotonic): no
    transfer starts past it, and none runs past it."""
    transfer: Transfer | None = None
    """Its KV transfer entry, while it holds one (TRANSFERRING, RESERVED)."""
    listener: Any = None
    """Who streams its tokens (the one-process server's HTTP stream); travels in every RequestOutput."""
    logprobs: list[Logprob] | None = None
    """Its generated tokens' log-probabilities, when params.logprobs asks for them."""
    prompt_logprobs: list[Logprob | None] | None = None
    """Its prompt tokens' log-probabilities (the first has none), when params.prompt_logprobs asks."""
    drafts: list[int] = field(default_factory=list)
    """Speculative decoding: the MTP layer's guesses of the tokens after its last one, verified next step."""
    draft_probs: Any = None
    """The distributions the drafts were drawn from ([K, V] tensor; None: drawn greedily)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidRequest(f"request {self.request_id}: max_new_tokens must be > 0")
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole prompt + output list (a decode step needs one)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.num_uncomputed > 1

    @property
    def finished(self) -> bool:
        """No more tokens will come (it may still hold pages: PREFILLED, TRANSFERRING)."""
        return self.finish_reason is not None

    def next_token(self, token: int, max_context: int) -> str | None:
        """Records a sampled token; returns why the request ends with it (stop, length) or None."""
        self.output_ids.append(token)
        if token == self.eos_token_id and not self.ignore_eos:
            return "stop"
        if len(self.output_ids) >= self.max_new_tokens or self.num_tokens >= max_context:
            return "length"
        return None

    def next_tokens(self, tokens: list[int], max_context: int) -> tuple[int, str | None]:
        """Records a verification's tokens up to the first that ends the request (never past a stop token or
        the length); returns (how many it kept, why it ends or None)."""
        for kept, token in enumerate(tokens, 1):
            if reason := self.next_token(token, max_context):
                return kept, reason
        return len(tokens), None
