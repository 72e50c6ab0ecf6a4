"""Prefill/decode disaggregation on top of LLMEngine and the KV transfer.

PrefillWorker: runs each request's prompt (chunked, prefix-cached), samples the first token, ships the
prompt's latents to the decode rank chosen for it, and frees its pages once the decode rank answered (or
the transfer failed). DecodeWorker: reserves pages before the transfer starts, starts decoding from the
first token when the latents land, and frees the reservation if they never come. Both are driven by
`step()`; the serving services (one per torchrun job) and the tests run them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import torch

from moe_pd.engine.core.request import SamplingParams
from moe_pd.engine.llm_engine import LLMEngine, RequestOutput
from moe_pd.kvcache.transfer.base import Transfer, TransferState
from moe_pd.kvcache.transfer.zmq_transport import KVReceiver, KVSender


@dataclass
class PrefillResult:
    request_id: str
    first_token: int
    state: TransferState
    detail: str = ""
    nbytes: int = 0
    latency_s: float = 0.0


class PrefillWorker:
    def __init__(self, engine: LLMEngine, sender: KVSender, timeout_s: float = 30.0, drop_transfers: int = 0) -> None:
        """`drop_transfers`: fault injection for tests; the first N transfers are never sent (so they time out)."""
        if not engine.scheduler.hold_finished_pages:
            raise ValueError("a prefill engine must hold finished pages until their KV is shipped")
        self.engine, self.sender, self.timeout_s = engine, sender, timeout_s
        self.drop_transfers = drop_transfers
        self.destinations: dict[str, str] = {}
        self.first_tokens: dict[str, int] = {}
        self._shipping: dict[str, object] = {}

    def submit(self, request_id: str, prompt_ids: list[int], decode_address: str,
               params: SamplingParams = SamplingParams(), seed: int | None = None) -> None:
        self.engine.add_request(request_id, prompt_ids, 1, params, seed, ignore_eos=True)
        self.destinations[request_id] = decode_address

    def cancel(self, request_id: str) -> Transfer | None:
        """An aborted request is dropped wherever it is and never reaches decode. Returns its transfer if
        one was in flight (now CANCELLED)."""
        transfer = self.sender.cancel(request_id)
        self.engine.abort(request_id)
        self.destinations.pop(request_id, None)
        self.first_tokens.pop(request_id, None)
        seq = self._shipping.pop(request_id, None)
        if seq is not None:
            self.engine.scheduler.release(seq)
        return transfer

    @property
    def has_work(self) -> bool:
        return self.engine.has_work or bool(self._shipping)

    def step(self, run_engine: bool | None = None) -> list[PrefillResult]:
        """Ships what finished prefill and settles answered transfers. `run_engine`: whether to run an
        engine step (under expert parallelism every rank must, when any rank has work); None: when this
        worker has work."""
        results = []
        if self.engine.has_work if run_engine is None else run_engine:
            _, outputs = self.engine.step()
            for out in outputs:
                if out.finished and out.new_token_ids:
                    self._ship(out)
                elif out.finished:  # the scheduler refused it (it can never fit this instance's cache)
                    self.destinations.pop(out.request_id, None)
                    results.append(PrefillResult(out.request_id, -1, TransferState.REJECTED, out.finish_reason or ""))
        for transfer in self.sender.poll(timeout_ms=0):
            results.append(self._settle(transfer))
        return results

    def _ship(self, out: RequestOutput) -> None:
        seq = self.engine.held.pop(out.request_id)
        n_pages = -(-len(seq.prompt_ids) // self.engine.allocator.block_size)
        self.first_tokens[out.request_id] = out.new_token_ids[0]
        rng = base64.b64encode(out.rng_state.numpy().tobytes()).decode() if out.rng_state is not None else ""
        drop = self.drop_transfers > 0
        self.drop_transfers -= drop
        transfer = self.sender.send(out.request_id, self.destinations.pop(out.request_id), self.engine.cache.kv_LPSW,
                                    seq.block_table[:n_pages], len(seq.prompt_ids), out.new_token_ids[0],
                                    self.timeout_s, rng, drop=drop)
        self._shipping[out.request_id] = seq
        if transfer.state.final:  # cancelled before it left
            self.engine.scheduler.release(seq)
            del self._shipping[out.request_id]

    def _settle(self, transfer: Transfer) -> PrefillResult:
        seq = self._shipping.pop(transfer.request_id, None)
        if seq is not None:
            self.engine.scheduler.release(seq)
        return PrefillResult(transfer.request_id, self.first_tokens.pop(transfer.request_id, -1), transfer.state,
                             transfer.detail, transfer.nbytes, transfer.latency_s or 0.0)


class DecodeWorker:
    def __init__(self, engine: LLMEngine, receiver: KVReceiver | None = None, timeout_s: float = 30.0) -> None:
        self.engine, self.timeout_s = engine, timeout_s
        self.receiver = receiver or KVReceiver(engine.cache.kv_LPSW)

    @property
    def address(self) -> str:
        return self.receiver.address

    def reserve(self, request_id: str, prompt_ids: list[int], max_new_tokens: int,
                params: SamplingParams = SamplingParams(), seed: int | None = None, ignore_eos: bool = False) -> None:
        """Pages for the prompt's latents, reserved before prefill ships them (raises OutOfBlocks if full)."""
        _, pages = self.engine.add_prefilled(request_id, prompt_ids, max_new_tokens, params, seed, ignore_eos)
        self.receiver.expect(request_id, pages, self.timeout_s)

    def abort(self, request_id: str) -> None:
        """Frees the request's pages, reserved or decoding; KV that still arrives for it is rejected."""
        self.receiver.cancel(request_id)
        self.engine.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    def step(self, run_engine: bool | None = None) -> list[RequestOutput]:
        """Starts requests whose KV arrived (or fails those whose transfer did not) and decodes one step.
        `run_engine` as in PrefillWorker.step."""
        outputs = []
        for transfer in self.receiver.poll(timeout_ms=0):
            if transfer.state is TransferState.DONE:
                rng = None
                if transfer.rng_state:
                    rng = torch.frombuffer(bytearray(base64.b64decode(transfer.rng_state)), dtype=torch.uint8)
                seq = self.engine.activate_prefilled(transfer.request_id, transfer.first_token, rng)
                outputs.append(RequestOutput(seq.request_id, [transfer.first_token], seq.finished,
                                             seq.finish_reason))
            else:
                reason = f"error: KV transfer {transfer.state.value}: {transfer.detail}"
                self.engine.drop_prefilled(transfer.request_id, reason)
                outputs.append(RequestOutput(transfer.request_id, [], True, reason))
        if self.engine.scheduler.running or self.engine.scheduler.waiting if run_engine is None else run_engine:
            outputs += self.engine.step()[1]
        return outputs
