"""POST /v1/completions and /v1/chat/completions: one HTTP request -> one Job per (prompt, sample), their
chunks merged into one response (JSON, or SSE when streaming).

Every choice ends stop (EOS or a stop string), length, or with the request's error; a stop string aborts its
sequence on the backend. A client that goes away (streaming or not) has every unfinished sequence aborted:
non-streaming handlers check their connection while they wait. With `stream_options.include_usage` the last
chunk before [DONE] carries usage and no choices; chat streams open each choice with `delta.role`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from moe_pd.engine.core.request import InvalidRequest
from moe_pd.engine.tokenizer import Tokenizer
from moe_pd.serve.backend import Backend, Chunk, Job, Stream
from moe_pd.serve.metrics import Metrics
from moe_pd.serve.openai_api import APIError, GenerationRequest, check_prompt, decode_body, parse_request, unavailable
from moe_pd.serve.openai_output import Choice, envelope, final_choice, stream_choice, usage

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
"""How often a non-streaming handler checks that its client is still connected."""


@dataclass
class Front:
    """What the handlers share: the backend, the tokenizer, the limits, the metrics, the drain state."""

    backend: Backend
    tokenizer: Tokenizer | None
    model_name: str
    max_tokens_limit: int
    vocab_size: int
    max_context: int
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    retry_after_s: float = 2.0
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def tokenize(self, req: GenerationRequest) -> None:
        for prompt in req.prompts:
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise APIError("this model has no tokenizer: send 'prompt' as token ids", param="prompt")
                ids = self.tokenizer.encode(prompt)
            else:
                ids = prompt
            check_prompt(ids, self.vocab_size, self.max_context)
            req.prompt_ids.append(ids)

    def echo_text(self, req: GenerationRequest, i: int) -> str:
        prompt = req.prompts[i]
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt) if self.tokenizer is not None else ""


def _failure(item: Exception) -> APIError:
    if isinstance(item, APIError):
        return item
    if isinstance(item, InvalidRequest):
        return APIError(str(item))
    return APIError("internal error", 500, kind="server_error")


async def generate(front: Front, request: web.Request, chat: bool) -> web.StreamResponse:
    req = parse_request(decode_body(await request.read()), chat, [front.model_name], front.max_tokens_limit)
    front.tokenize(req)
    if front.draining:
        raise unavailable("the server is shutting down", front.retry_after_s)
    front.in_flight += 1
    front.idle.clear()
    try:
        return await _Generation(front, request, req).run()
    finally:
        front.in_flight -= 1
        if front.in_flight == 0:
            front.idle.set()


def request_id(request: web.Request, chat: bool) -> str:
    """A unique id naming the request in the router's and the instances' logs, returned in the response's
    X-Request-Id header: the client's X-Request-Id (printable, up to 64 characters) plus a unique suffix,
    or a fresh one."""
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= 64 and given.isprintable() and " " not in given:
        return f"{given}.{uuid.uuid4().hex[:8]}"
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"


class _Generation:
    def __init__(self, front: Front, request: web.Request, req: GenerationRequest) -> None:
        self.front, self.request, self.req = front, request, req
        self.id = request_id(request, req.chat)
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streams: list[Stream] = []
        self.choices: list[Choice] = []
        self.response: web.StreamResponse | None = None
        self.first_at: float | None = None
        self.checked = time.monotonic()

    def _submit(self) -> None:
        req, loop = self.req, asyncio.get_running_loop()
        for i, prompt_ids in enumerate(req.prompt_ids):
            for j in range(req.n):
                index = i * req.n + j
                rid = self.id if req.num_choices == 1 else f"{self.id}-{index}"
                seed = req.seed if req.seed is None or j == 0 else (req.seed + j) % 2**63
                self.choices.append(Choice(index, self.front.tokenizer, req.stop, req.echo,
                                           self.front.echo_text(req, i) if req.echo else "", prompt_ids))
                stream = Stream(rid, loop, self.queue, index)
                self.streams.append(stream)
                self.front.backend.submit(stream, Job(prompt_ids, req.max_tokens, req.params, seed, req.ignore_eos))

    def _abort_unfinished(self) -> None:
        for stream, choice in zip(self.streams, self.choices):
            if not choice.finished:
                self.front.backend.abort(stream.request_id)

    def _disconnected(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def _next(self):
        if self.req.stream:
            return await self.queue.get()
        while True:  # a non-streaming client that goes away is noticed here, tokens flowing or not
            now = time.monotonic()
            if now - self.checked >= DISCONNECT_POLL_S:
                self.checked = now
                if self._disconnected():
                    raise ConnectionResetError("the client went away")
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> web.StreamResponse:
        metrics = self.front.metrics
        self._submit()
        try:
            while not all(c.finished for c in self.choices):
                index, item = await self._next()
                choice = self.choices[index]
                if isinstance(item, Exception):
                    if choice.finished:
                        continue  # an aborted sequence's late news
                    failure = _failure(item)
                    metrics.requests.labels("rejected" if failure.status < 500 else "failed").inc()
                    self._abort_unfinished()
                    if self.response is None:
                        raise failure
                    await self._write({"error": failure.body()["error"]})
                    await self.response.write_eof()
                    return self.response
                if choice.finished:
                    continue
                if item.ids and self.first_at is None:
                    self.first_at = time.monotonic()
                    metrics.ttft.observe(self.first_at - self.streams[index].submitted)
                metrics.tokens.inc(len(item.ids))
                if choice.add(item):
                    self.front.backend.abort(self.streams[index].request_id)  # a stop string ended it
                if self.req.stream:
                    await self._stream_chunk(choice, item)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            self._abort_unfinished()  # the client went away: free its pages everywhere
            metrics.requests.labels("aborted").inc()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.info("request %s: the client went away; aborted", self.id)  # an everyday event, not an error
            return self.response or web.Response(status=499)
        for choice in self.choices:
            metrics.requests.labels(choice.reason or "unknown").inc()
        if self.first_at is not None and len(self.choices) == 1 and len(self.choices[0].ids) > 1:
            metrics.tpot.observe((time.monotonic() - self.first_at) / (len(self.choices[0].ids) - 1))
        return await self._finish()

    def _usage(self) -> dict:
        # each prompt is counted once (its first choice's cache hits), as its tokens are
        cached = sum(c.cached or 0 for c in self.choices[:: self.req.n])
        return usage(sum(map(len, self.req.prompt_ids)), sum(len(c.ids) for c in self.choices), cached)

    async def _write(self, body: dict) -> None:
        await self.response.write(f"data: {json.dumps(body)}\n\n".encode())

    async def _prepare(self) -> None:
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Request-Id": self.id,
                                                    "Cache-Control": "no-cache"})
        await self.response.prepare(self.request)
        if self.req.chat:  # OpenAI opens every chat choice with the role
            for choice in self.choices:
                opening = {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}
                await self._send([{**opening, "token_ids": []} if self.req.return_token_ids else opening])

    async def _send(self, choices: list[dict]) -> None:
        body = envelope(self.id, self.created, self.front.model_name, self.req.chat, True, choices)
        if self.req.continuous_usage:
            body["usage"] = self._usage()
        elif self.req.include_usage:
            body["usage"] = None
        await self._write(body)

    async def _stream_chunk(self, choice: Choice, item: Chunk) -> None:
        if self.response is None:
            await self._prepare()
        text = choice.delta()
        logprobs = choice.stream_logprobs(self.req.chat) if self.req.logprobs is not None else None
        if not choice.sent_echo:
            choice.sent_echo = True
            text = choice.echo_text + text
            if logprobs is not None:
                echoed = choice.completion_logprobs(choice.echo_entries(), 0)
                logprobs = {k: echoed[k] + logprobs[k] for k in echoed}
        if text or item.ids or choice.finished or logprobs:
            await self._send([stream_choice(choice, self.req.chat, text, item.ids, logprobs,
                                            self.req.return_token_ids)])

    async def _finish(self) -> web.StreamResponse:
        if self.req.stream:
            if self.response is None:
                await self._prepare()
            if self.req.include_usage or self.req.continuous_usage:
                body = envelope(self.id, self.created, self.front.model_name, self.req.chat, True, [])
                await self._write({**body, "usage": self._usage()})
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
            return self.response
        choices = [final_choice(c, self.req.chat, self.req.logprobs is not None, self.req.return_token_ids)
                   for c in self.choices]
        body = envelope(self.id, self.created, self.front.model_name, self.req.chat, False, choices)
        return web.json_response({**body, "usage": self._usage()}, headers={"X-Request-Id": self.id})
