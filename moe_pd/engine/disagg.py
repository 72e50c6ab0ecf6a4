"""Prefill/decode disaggregation on top of LLMEngine and a KV transfer backend (moe_pd.kvcache.transfer).

PrefillWorker: runs each request's prompt (chunked, prefix-cached), samples the first token (PREFILLED),
ships the prompt's latents to the decode rank's reservation (TRANSFERRING) and frees its pages once the
transfer ended or its deadline passed (capped at the reservation's expiry). DecodeWorker: reserves pages
before the transfer starts (RESERVED), starts decoding from the first token when the latents land, and fails
the reservation if they never come: its pages are freed at once, or kept FENCED while a write the sender
gave up on may still land (NIXL). The requests' states and transfer entries are the engine's records
(engine.requests); the workers move bytes through the backend's two ends (KVSenderEnd, KVReceiverEnd). Both
are driven by `step()`; the serving ranks (moe_pd.serve.rank) and the tests run them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from moe_pd.engine.core.request import Logprob, Request, SamplingParams, State
from moe_pd.engine.llm_engine import LLMEngine, RequestOutput, output
from moe_pd.kvcache.transfer.base import (
    KVHeader,
    KVReceiverEnd,
    KVSenderEnd,
    KVTarget,
    Transfer,
    TransferError,
    TransferState,
)
from moe_pd.kvcache.transfer.zmq_transport import KVReceiver
from moe_pd.runtime import dtype_name

log = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    """Prefill is done with a request: its transfer ended in `state` (or it failed before one: `error`)."""

    request_id: str
    first_token: int
    state: TransferState
    detail: str = ""
    nbytes: int = 0
    latency_s: float = 0.0
    logprobs: list[Logprob] | None = None
    """The first token's log-probability, when the request asked (decode's tokens carry the rest)."""
    prompt_logprobs: list[Logprob | None] | None = None
    error: str = ""
    """Why the request failed before its KV was shipped (no token could be sampled, the address was
    unusable); '' when it was shipped."""


class PrefillWorker:
    def __init__(self, engine: LLMEngine, sender: KVSenderEnd, timeout_s: float = 30.0,
                 drop_transfers: int = 0) -> None:
        """`drop_transfers`: fault injection (testing.drop_kv_transfers); the first N transfers are never sent
        (as if lost on the wire), so they time out."""
        if not engine.scheduler.hold_finished_pages:
            raise ValueError("a prefill engine must hold finished pages until their KV is shipped")
        self.engine, self.sender, self.timeout_s = engine, sender, timeout_s
        self.drop_transfers = drop_transfers

    def submit(self, request_id: str, prompt_ids: list[int], target: KVTarget,
               params: SamplingParams = SamplingParams(), seed: int | None = None) -> Request:
        """Queues a prompt whose KV goes to `target` (raises TransferError for a target of another backend)."""
        if target.backend != self.sender.backend:
            raise TransferError(f"the decode rank receives KV over {target.backend}, this prefill rank sends over "
                                f"{self.sender.backend}: set kvcache.transfer the same on both instances")
        req = self.engine.add_request(request_id, prompt_ids, 1, params, seed, ignore_eos=True, destination=target)
        req.destination_expires = time.monotonic() + target.expires_in_s
        return req

    def cancel(self, request_id: str) -> bool:
        """An aborted request is dropped wherever it is and never reaches decode: a transfer under way is given
        up, and the decode rank is told (best effort) so it may reuse the reserved pages early."""
        req = self.engine.requests.get(request_id)
        if req is None:
            return False
        if req.destination is not None:
            self.sender.cancel(request_id, req.destination, req.state is State.TRANSFERRING, "aborted")
        return self.engine.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    def step(self, run_engine: bool | None = None) -> list[PrefillResult]:
        """Runs an engine step, ships what finished prefill and settles ended or expired transfers.
        `run_engine`: whether to run the engine step (under expert parallelism every rank must, when any rank
        has work); None: when this rank has requests to run."""
        results = []
        requests = self.engine.requests
        if self.engine.scheduler.has_runnable if run_engine is None else run_engine:
            for out in self.engine.step()[1]:
                if out.finished and (out.finish_reason or "").startswith("error"):
                    results.append(PrefillResult(out.request_id, -1, TransferState.CANCELLED, error=out.finish_reason))
        for req in requests.in_state(State.PREFILLED):
            try:
                failed = self._ship(req)
            except Exception as exc:  # this request's destination or bytes: it fails alone
                log.exception("shipping the KV of %s to %r failed", req.request_id, req.destination)
                self._give_up(req, f"{type(exc).__name__}: {exc}")
                requests.transition(req, State.FAILED, f"error: its KV could not be sent ({type(exc).__name__})")
                failed = PrefillResult(req.request_id, -1, TransferState.CANCELLED, error=req.finish_reason)
            if failed is not None:
                results.append(failed)
        for answer in self.sender.poll():
            req = requests.get(answer.request_id)
            if req is not None and req.state is State.TRANSFERRING:
                req.transfer.finish(answer.state, answer.detail)
                results.append(self._result(req, req.transfer))
                requests.transition(req, State.FINISHED if answer.state is TransferState.DONE else State.FAILED)
        for req, transfer in requests.expired():
            self.sender.cancel(req.request_id, req.destination, True, transfer.detail)
            results.append(self._result(req, transfer))
        return results

    def _ship(self, req: Request) -> PrefillResult | None:
        """Starts the request's transfer (TRANSFERRING); a transfer that cannot start fails it at once (the
        returned result)."""
        now, target, kv = time.monotonic(), req.destination, self.engine.cache.kv_LPSW
        transfer = Transfer(min(now + self.timeout_s, req.destination_expires), target.address)
        req.transfer = transfer
        self.engine.requests.transition(req, State.TRANSFERRING)
        header = KVHeader(req.request_id, kv.shape[0], kv.shape[3], dtype_name(kv.dtype), len(req.prompt_ids),
                          req.output_ids[0], getattr(self.sender, "name", ""), rng_bytes(req), shipped_drafts(req),
                          cached_tokens=req.num_cached_hit)
        if self.drop_transfers > 0:
            self.drop_transfers -= 1
            log.warning("fault injection: KV transfer of %s dropped", req.request_id)
            return None
        try:
            if now >= req.destination_expires:
                raise TransferError("the decode rank's reservation expired before the transfer")
            transfer.nbytes = self.sender.send(target, kv, self.engine.requests.prompt_pages(req), header,
                                               transfer.deadline)
        except TransferError as exc:
            transfer.finish(TransferState.FAILED, str(exc))
            self.sender.cancel(req.request_id, target, False, str(exc))
            self.engine.requests.transition(req, State.FAILED, f"error: KV transfer failed: {exc}")
            return self._result(req, transfer)
        return None

    def _give_up(self, req: Request, reason: str) -> None:
        """Best effort: stops a write that may have been posted and tells the decode rank (which fences its
        pages until it knows no write lands)."""
        try:
            self.sender.cancel(req.request_id, req.destination, req.state is State.TRANSFERRING, reason)
        except Exception:
            log.exception("giving up on the KV transfer of %s failed", req.request_id)

    @staticmethod
    def _result(req: Request, t: Transfer) -> PrefillResult:
        return PrefillResult(req.request_id, req.output_ids[0], t.state, t.detail, t.nbytes, t.latency_s,
                             req.logprobs, req.prompt_logprobs)


def shipped_drafts(req: Request) -> list[int]:
    """A greedy request's MTP drafts after its first token (decode verifies them at once); none for a sampled
    one, whose drafts' distributions stay here (decode drafts anew in its first step)."""
    return list(req.drafts) if req.draft_probs is None else []


def rng_bytes(req: Request) -> bytes:
    """The request's sampling generator state after its first token (b'' for greedy)."""
    return req.generator.get_state().numpy().tobytes() if req.generator is not None else b""


class DecodeWorker:
    def __init__(self, engine: LLMEngine, receiver: KVReceiverEnd | None = None, timeout_s: float = 30.0) -> None:
        self.engine, self.timeout_s = engine, timeout_s
        self.receiver = receiver or KVReceiver(engine.cache.kv_LPSW)

    @property
    def address(self) -> str:
        return self.receiver.address

    def reserve(self, request_id: str, prompt_ids: list[int], max_new_tokens: int,
                params: SamplingParams = SamplingParams(), seed: int | None = None,
                ignore_eos: bool = False) -> Request:
        """Pages for the prompt's latents, reserved before prefill ships them (raises OutOfBlocks if full)."""
        return self.engine.reserve(request_id, prompt_ids, max_new_tokens, self.timeout_s, params, seed, ignore_eos)

    def target(self, req: Request) -> KVTarget:
        """Where prefill sends a RESERVED request's KV (its Reserved event carries it)."""
        remaining = max(0.0, req.transfer.deadline - time.monotonic())
        return self.receiver.target(self.engine.requests.prompt_pages(req), remaining)

    def abort(self, request_id: str, writer: bool = True) -> None:
        """Ends the request and frees its pages, at once unless a write may still land in its reserved pages
        (then FENCED). `writer`: whether a prefill rank was ever asked to write its KV."""
        req = self.engine.requests.get(request_id)
        if req is not None and req.state is State.RESERVED and writer and self.receiver.fence_s > 0:
            self.engine.requests.fence(req, TransferState.CANCELLED, "aborted", "abort", self.receiver.fence_s)
        else:
            self.engine.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    def _pages_for(self, request_id: str) -> list[int] | None:
        req = self.engine.requests.get(request_id)
        return self.engine.requests.prompt_pages(req) if req is not None and req.state is State.RESERVED else None

    def step(self, run_engine: bool | None = None) -> list[RequestOutput]:
        """Starts requests whose KV arrived (or fails those whose transfer did not) and decodes one step.
        `run_engine` as in PrefillWorker.step."""
        outputs = []
        requests, fence_s = self.engine.requests, self.receiver.fence_s
        for arrival in self.receiver.poll(self._pages_for):
            req = requests.get(arrival.request_id)
            if req is not None and req.state is State.FENCED and arrival.quiet:
                requests.reclaim(req)  # a notice proves nothing writes into its pages any more
            if req is None or req.state is not State.RESERVED:
                continue
            if arrival.state is TransferState.DONE:
                rng = arrival.header.rng_state
                rng_state = torch.frombuffer(bytearray(rng), dtype=torch.uint8) if rng else None
                req.num_cached_hit = arrival.header.cached_tokens
                outputs.append(self.engine.activate(req, arrival.header.first_token, rng_state,
                                                    arrival.header.drafts))
                continue
            reason = f"error: KV transfer {arrival.state.value}: {arrival.detail}"
            if arrival.quiet or fence_s == 0:
                req.transfer.finish(arrival.state, arrival.detail)
                outputs.append(self.engine.fail(req, reason))
            else:
                requests.fence(req, arrival.state, arrival.detail, reason, fence_s)
                outputs.append(output(req, []))
        for req, _ in requests.expired(fence_s=fence_s):
            outputs.append(output(req, []))
        if self.engine.scheduler.has_runnable if run_engine is None else run_engine:
            outputs += self.engine.step()[1]
        return outputs
