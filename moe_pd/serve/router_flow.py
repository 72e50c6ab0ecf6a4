"""One request's way through the cluster, as the router runs it: attempts (moe_pd.serve.router_requests),
back-pressure, re-runs and migration.

- **Back-pressure**: an attempt WAITs at the router until a decode instance (colocated: any) has room for it,
  by its heartbeats, and a prefill instance is up; a reservation refused for pages sends it back to WAITING.
  The wait is bounded: at most `max_waiting` requests wait, each at most `queue_timeout_s`, then 503 with
  Retry-After.
- **Re-run and migration**: an attempt that fails for a reason another may not (a KV transfer, a lost
  instance, a retryable error) ends FAILED, which aborts it wherever it is held, and the next attempt runs
  from prefill with the tokens already streamed appended to the prompt, so the client's stream continues
  (Dynamo's request migration). A request fails only after `migration_limit` such failures, or when no
  instance can take it in time. A failed transfer's decode rank is excluded from the next reservation.
- **Logprobs**: on PD the first token is sampled by prefill, whose Prefilled carries its log-probability (and
  the prompt's, for echo); decode's tokens wait for it when the client asked for logprobs.

Errors name the role that failed and carry no internal details (addresses, ranks, page counts: those are in
the router's log).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from moe_pd.serve import protocol as p
from moe_pd.serve.backend import Chunk, Job, Stream
from moe_pd.serve.openai_api import APIError, unavailable
from moe_pd.serve.router_requests import DOWN, Attempt, Phase

log = logging.getLogger("moe_pd.serve.router")

POLL_S = 0.05
"""How often a waiting request looks for room again."""


class Retry(Exception):
    """The attempt failed in a way another attempt may not; the message names the role that failed."""


def _client_message(msg: p.Error) -> str:
    return msg.message.removeprefix("error: ")


def _refusal(msg: p.Error, role: str) -> APIError:
    """An instance's final no: the request's own fault (4xx, its message), or the named role's (5xx)."""
    if msg.status < 500:
        return APIError(_client_message(msg), msg.status)
    return APIError(f"the {role} instance failed the request ({_client_message(msg)})", msg.status,
                    kind="server_error")


class Flow:
    def __init__(self, backend, stream: Stream, job: Job) -> None:
        """`backend`: the router's ClusterBackend (its config, table, metrics and instance choices)."""
        self.backend, self.cfg, self.stream, self.job = backend, backend.cfg, stream, job
        self.requests = backend.requests
        self.streamed: list[int] = []
        """Tokens the client has."""
        self.prompt_logprobs_sent = job.params.prompt_logprobs is None
        self.failed_ranks: set[str] = set()
        self.number = 0

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._attempt()
                return
            except Retry as why:
                failures += 1
                self.backend.metrics.retries.inc()
                if failures > self.cfg.migration_limit:
                    raise unavailable(f"the request failed: {why}", self.cfg.retry_after_s) from None
                log.warning("request %s: %s; running it again (%d token(s) streamed so far)",
                            self.stream.request_id, why, len(self.streamed))

    async def _attempt(self) -> None:
        job = self.job
        attempt = self.requests.open(self.stream.request_id, self.number, Phase.WAITING, len(self.streamed))
        self.number += 1
        params = job.params if not self.prompt_logprobs_sent else dataclasses.replace(job.params, prompt_logprobs=None)
        spec = (job.prompt_ids + self.streamed, job.max_tokens - len(self.streamed), params, job.seed)
        ending = Phase.FAILED
        try:
            await (self._colocated(attempt, *spec) if self.backend.colocated else self._disaggregated(attempt, *spec))
            ending = Phase.FINISHED
        except asyncio.CancelledError:
            ending = Phase.ABORTED
            raise
        finally:
            self.requests.end(attempt, ending)  # FAILED/ABORTED: every instance still holding it is told

    # waiting for room --------------------------------------------------------------------------------------
    async def _room(self, pick, what: str):
        """Back-pressure: `pick()`'s instances once it finds some, waiting (bounded) until it does."""
        if (chosen := pick()) is not None:
            return chosen
        if self.requests.count(Phase.WAITING) > self.cfg.max_waiting:
            raise unavailable("too many requests are waiting for room in the cluster", self.cfg.retry_after_s)
        deadline = time.monotonic() + self.cfg.queue_timeout_s
        while (chosen := pick()) is None:
            if time.monotonic() > deadline:
                raise unavailable(f"no {what} had room for the request within {self.cfg.queue_timeout_s:.0f} s",
                                  self.cfg.retry_after_s)
            await asyncio.sleep(POLL_S)
        return chosen

    async def _next(self, attempt: Attempt):
        try:
            return await asyncio.wait_for(attempt.inbox.get(), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(f"no progress from the cluster in {self.cfg.request_timeout_s:.0f} s", 504,
                           kind="server_error") from None

    def _emit(self, msg: p.Tokens, first: list | None, prompt_logprobs) -> None:
        logprobs = msg.logprobs
        if first is not None and logprobs is not None and len(logprobs) < len(msg.ids):
            logprobs = first[: len(msg.ids) - len(logprobs)] + logprobs
        if prompt_logprobs is not None and not self.prompt_logprobs_sent:
            self.prompt_logprobs_sent = True
        else:
            prompt_logprobs = None
        self.stream.put(Chunk(msg.ids, msg.finished, msg.reason, logprobs, prompt_logprobs, msg.cached))
        self.streamed += msg.ids

    # colocated ----------------------------------------------------------------------------------------------
    async def _colocated(self, attempt: Attempt, prompt, max_tokens, params, seed) -> None:
        inst = await self._room(lambda: self.backend.pick_colocated(prompt), "colocated instance")
        self.requests.transition(attempt, Phase.PREFILLING)
        attempt.decode = inst
        self.requests.send(attempt, inst, p.Generate(attempt.rid, prompt, max_tokens, params, seed,
                                                     self.job.ignore_eos))
        while True:
            _, msg = await self._next(attempt)
            if msg == DOWN:
                raise Retry("the colocated instance serving it went down")
            if isinstance(msg, p.Error):
                if msg.retry:
                    raise Retry(f"the colocated instance failed it ({_client_message(msg)})")
                raise _refusal(msg, "colocated")
            if attempt.phase is Phase.PREFILLING:
                self.requests.transition(attempt, Phase.STREAMING)
            self._emit(msg, None, msg.prompt_logprobs)
            if msg.finished:
                return

    # prefill and decode ------------------------------------------------------------------------------------
    async def _reserve(self, attempt: Attempt, prompt, max_tokens, params, seed):
        """A decode reservation and the prefill instances up: (Reserved, prefill instances)."""
        while True:
            decode, prefills = await self._room(lambda: self.backend.pick_pd(len(prompt), max_tokens),
                                                "decode instance")
            self.requests.transition(attempt, Phase.RESERVING)
            attempt.decode = decode
            decode_params = dataclasses.replace(params, prompt_logprobs=None)  # prefill computes those
            self.requests.send(attempt, decode, p.Reserve(attempt.rid, prompt, max_tokens, decode_params, seed,
                                                          self.job.ignore_eos, exclude=sorted(self.failed_ranks)))
            _, msg = await self._next(attempt)
            if msg == DOWN:
                raise Retry("the decode instance went down")
            if isinstance(msg, p.Error) and msg.retry:  # no room after all: wait for its next heartbeat
                decode.refused_at = time.monotonic()
                self.requests.transition(attempt, Phase.WAITING)
                continue
            if isinstance(msg, p.Error):
                raise _refusal(msg, "decode")
            return msg, prefills

    async def _disaggregated(self, attempt: Attempt, prompt, max_tokens, params, seed) -> None:
        reserved, prefills = await self._reserve(attempt, prompt, max_tokens, params, seed)
        decode, prefill = attempt.decode, self.backend.pick_prefill(prefills, prompt)
        attempt.address, attempt.prefill = reserved.kv.address, prefill
        self.requests.transition(attempt, Phase.PREFILLING)
        self.requests.send(attempt, prefill, p.Prefill(attempt.rid, prompt, reserved.kv, params, seed))
        wait_for_prefill = params.logprobs is not None or params.prompt_logprobs is not None
        held: list[p.Tokens] = []
        prefilled: p.Prefilled | None = None
        while True:
            source, msg = await self._next(attempt)
            if isinstance(msg, p.Tokens):
                if attempt.phase is Phase.PREFILLING:
                    self.requests.transition(attempt, Phase.STREAMING)
                held.append(msg)
            elif isinstance(msg, p.Prefilled):
                self.backend.observe_transfer(msg)
                if msg.state != "done":
                    self.failed_ranks.add(attempt.address)
                    raise Retry(f"its KV transfer from prefill to decode {msg.state.replace('_', ' ')}")
                prefilled = msg
            elif isinstance(msg, p.Error):
                role = "decode" if source is decode else "prefill"
                if "KV transfer" in msg.message:
                    self.failed_ranks.add(attempt.address)
                if msg.retry:
                    raise Retry(f"the {role} instance failed it ({_client_message(msg)})")
                raise _refusal(msg, role)
            elif msg == DOWN:
                if source is decode or prefilled is None and (wait_for_prefill or attempt.phase is not Phase.STREAMING):
                    raise Retry(f"the {'decode' if source is decode else 'prefill'} instance went down")
                continue  # prefill went away after shipping: decode has the KV
            if wait_for_prefill and prefilled is None:
                continue  # decode's tokens wait for the first token's logprobs (and the prompt's)
            for i, tokens in enumerate(held):
                self._emit(tokens, prefilled.logprobs if prefilled is not None and i == 0 else None,
                           prefilled.prompt_logprobs if prefilled is not None else None)
                if tokens.finished:
                    return
            held.clear()
