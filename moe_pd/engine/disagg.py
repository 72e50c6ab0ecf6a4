"""Prefill/decode disaggregation on top of LLMEngine and a KV transfer engine.

PrefillWorker: runs each request's prompt (chunked, prefix-cached), samples the first token (PREFILLED),
ships the prompt's latents to the decode rank chosen for it (TRANSFERRING) and frees its pages once that
rank answered or the deadline passed. DecodeWorker: reserves pages before the transfer starts (RESERVED),
starts decoding from the first token when the latents land, and frees the reservation if they never come.
The requests' states and transfer entries are the engine's records (engine.requests); the workers move
bytes. Both are driven by `step()`; the serving ranks (moe_pd.serve.rank) and the tests run them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from moe_pd.engine.core.request import Logprob, Request, SamplingParams, State
from moe_pd.engine.llm_engine import LLMEngine, RequestOutput
from moe_pd.kvcache.transfer.base import Transfer, TransferState
from moe_pd.kvcache.transfer.zmq_transport import KVReceiver, KVSender

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
    def __init__(self, engine: LLMEngine, sender: KVSender, timeout_s: float = 30.0, drop_transfers: int = 0) -> None:
        """`drop_transfers`: fault injection (testing.drop_kv_transfers); the first N transfers are never sent,
        so they time out."""
        if not engine.scheduler.hold_finished_pages:
            raise ValueError("a prefill engine must hold finished pages until their KV is shipped")
        self.engine, self.sender, self.timeout_s = engine, sender, timeout_s
        self.drop_transfers = drop_transfers

    def submit(self, request_id: str, prompt_ids: list[int], decode_address: str,
               params: SamplingParams = SamplingParams(), seed: int | None = None) -> Request:
        return self.engine.add_request(request_id, prompt_ids, 1, params, seed, ignore_eos=True,
                                       destination=decode_address)

    def cancel(self, request_id: str) -> bool:
        """An aborted request is dropped wherever it is and never reaches decode (a transfer on the wire
        ends CANCELLED; decode rejects its KV if it still arrives)."""
        return self.engine.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    def step(self, run_engine: bool | None = None) -> list[PrefillResult]:
        """Runs an engine step, ships what finished prefill and settles answered or expired transfers.
        `run_engine`: whether to run the engine step (under expert parallelism every rank must, when any rank
        has work); None: when this rank has requests to run."""
        results = []
        requests = self.engine.requests
        if self.engine.scheduler.running or self.engine.scheduler.waiting if run_engine is None else run_engine:
            for out in self.engine.step()[1]:
                if out.finished and (out.finish_reason or "").startswith("error"):
                    results.append(PrefillResult(out.request_id, -1, TransferState.CANCELLED, error=out.finish_reason))
        for req in requests.in_state(State.PREFILLED):
            try:
                self._ship(req)
            except Exception as exc:  # this request's destination or bytes: it fails alone
                log.exception("shipping the KV of %s to %r failed", req.request_id, req.destination)
                requests.transition(req, State.FAILED, f"error: its KV could not be sent ({type(exc).__name__})")
                results.append(PrefillResult(req.request_id, -1, TransferState.CANCELLED, error=req.finish_reason))
        for answer in self.sender.poll(timeout_ms=0):
            req = requests.get(answer.request_id)
            if req is not None and req.state is State.TRANSFERRING:
                req.transfer.finish(answer.state, answer.detail)
                results.append(self._result(req, req.transfer))
                requests.transition(req, State.FINISHED if answer.state is TransferState.DONE else State.FAILED)
        for req, transfer in requests.expired():
            results.append(self._result(req, transfer))
        return results

    def _ship(self, req: Request) -> None:
        transfer = Transfer(time.monotonic() + self.timeout_s, req.destination)
        drop = self.drop_transfers > 0
        self.drop_transfers -= drop
        rng = rng_bytes(req)
        transfer.nbytes = self.sender.send(req.request_id, req.destination, self.engine.cache.kv_LPSW,
                                           self.engine.requests.prompt_pages(req), len(req.prompt_ids),
                                           req.output_ids[0], rng, drop=drop)
        req.transfer = transfer
        self.engine.requests.transition(req, State.TRANSFERRING)

    @staticmethod
    def _result(req: Request, t: Transfer) -> PrefillResult:
        return PrefillResult(req.request_id, req.output_ids[0], t.state, t.detail, t.nbytes, t.latency_s,
                             req.logprobs, req.prompt_logprobs)


def rng_bytes(req: Request) -> bytes:
    """The request's sampling generator state after its first token (b'' for greedy)."""
    return req.generator.get_state().numpy().tobytes() if req.generator is not None else b""


class DecodeWorker:
    def __init__(self, engine: LLMEngine, receiver: KVReceiver | None = None, timeout_s: float = 30.0) -> None:
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

    def abort(self, request_id: str) -> None:
        """Frees the request's pages, reserved or decoding; KV that still arrives for it is rejected."""
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
        requests = self.engine.requests
        for arrival in self.receiver.poll(self._pages_for, timeout_ms=0):
            req = requests.get(arrival.request_id)
            if arrival.state is TransferState.DONE:
                rng = arrival.header.rng_state
                rng_state = torch.frombuffer(bytearray(rng), dtype=torch.uint8) if rng else None
                outputs.append(self.engine.activate(req, arrival.header.first_token, rng_state))
            else:
                req.transfer.finish(arrival.state, arrival.detail)
                outputs.append(self.engine.fail(req, f"error: KV transfer {arrival.state.value}: {arrival.detail}"))
        for req, _ in requests.expired():
            outputs.append(RequestOutput(req.request_id, [], True, req.finish_reason, listener=req.listener))
        if self.engine.scheduler.running or self.engine.scheduler.waiting if run_engine is None else run_engine:
            outputs += self.engine.step()[1]
        return outputs
