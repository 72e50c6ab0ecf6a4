"""The OpenAI-compatible HTTP app over a Backend: one engine in this process (moe_pd.serve.api_server) or a
PD cluster (moe_pd.serve.router).

Endpoints: POST /v1/completions and /v1/chat/completions (streaming over SSE with "stream": true),
GET /v1/models, /health, /metrics (Prometheus). Prompts are text or token ids; "return_token_ids": true
adds the generated ids to each choice as `token_ids`. Bad requests get HTTP 4xx with an OpenAI-style error
body; a client that disconnects has its request aborted and its pages freed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid

from aiohttp import web
from aiohttp.web_log import AccessLogger
from prometheus_client import generate_latest

from moe_pd.engine.core.request import InvalidRequest
from moe_pd.engine.tokenizer import Tokenizer
from moe_pd.serve.backend import Backend, Stream
from moe_pd.serve.metrics import Metrics
from moe_pd.serve.openai_api import APIError, GenerationRequest, check_prompt, parse_request

log = logging.getLogger(__name__)


class IncrementalText:
    """Streams text as tokens arrive without splitting characters: a token that ends inside a multi-byte
    character (the decoded text ends in U+FFFD) is held back until the character is complete."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, ids: list[int], final: bool) -> str:
        if self.tokenizer is None:
            return ""
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def build_app(backend: Backend, tokenizer: Tokenizer | None, model_name: str, max_tokens_limit: int,
              vocab_size: int, max_context: int, metrics: Metrics | None = None) -> web.Application:
    """The HTTP app over a backend: an engine in this process (EngineLoop) or a PD cluster (router)."""
    metrics = metrics or Metrics()
    app = web.Application()

    def error(exc: APIError) -> web.Response:
        return web.json_response(exc.body(), status=exc.status)

    async def read(request: web.Request, chat: bool) -> GenerationRequest:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError("the request body is not valid JSON") from None
        parsed = parse_request(body, chat, [model_name], max_tokens_limit)
        if parsed.prompt_ids is None:
            if tokenizer is None:
                raise APIError("this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt")
            parsed.prompt_ids = tokenizer.encode(parsed.prompt_text)
        check_prompt(parsed.prompt_ids, vocab_size, max_context)
        return parsed

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            req = await read(request, chat)
        except APIError as exc:
            return error(exc)
        request_id = _request_id(request, chat)
        stream = Stream(request_id, asyncio.get_running_loop())
        backend.submit(stream, req)
        created = int(time.time())
        response = None
        ids: list[int] = []
        first_at = None
        reason = None
        text = IncrementalText(tokenizer)
        try:
            while True:
                item = await stream.tokens.get()
                if isinstance(item, Exception):
                    failure = item if isinstance(item, APIError) else (
                        APIError(str(item)) if isinstance(item, InvalidRequest) else
                        APIError(str(item), status=500, kind="server_error"))
                    metrics.requests.labels("rejected" if failure.status < 500 else "failed").inc()
                    if response is None:
                        return error(failure)
                    await response.write(f"data: {json.dumps(failure.body())}\n\n".encode())
                    await response.write_eof()
                    return response
                new, finished, reason = item
                if new and first_at is None:
                    first_at = time.monotonic()
                    metrics.ttft.observe(first_at - stream.submitted)
                ids += new
                metrics.tokens.inc(len(new))
                if req.stream:
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "X-Request-Id": request_id,
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                    chunk = _chunk(request_id, created, model_name, chat, new, text.add(new, finished),
                                   reason if finished else None, req.return_token_ids)
                    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if finished:
                    break
        except (asyncio.CancelledError, ConnectionResetError):
            backend.abort(request_id)  # the client went away: free its pages everywhere
            metrics.requests.labels("aborted").inc()
            raise
        if first_at is not None and len(ids) > 1:
            metrics.tpot.observe((time.monotonic() - first_at) / (len(ids) - 1))
        metrics.requests.labels(reason or "unknown").inc()
        if req.stream:
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        body = _final(request_id, created, model_name, chat, ids, tokenizer, reason, req.return_token_ids,
                      len(req.prompt_ids))
        return web.json_response(body, headers={"X-Request-Id": request_id})

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": model_name, "object": "model",
                                                              "owned_by": "moe_pd"}]})

    async def health(_):
        ok, body = backend.health()
        return web.json_response(body, status=200 if ok else 503)

    async def prometheus(_):
        backend.refresh(metrics)
        return web.Response(body=generate_latest(metrics.registry), content_type="text/plain")

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    return app


class ProbeQuietAccessLogger(AccessLogger):
    """aiohttp's access log without /health and /metrics, which load balancers and Prometheus poll."""

    def log(self, request, response, time: float) -> None:
        if request.path not in ("/health", "/metrics"):
            super().log(request, response, time)


async def serve_until_signalled(app: web.Application, host: str, port: int, banner: str) -> None:
    """Serves `app` until SIGINT or SIGTERM. `banner` is printed with {url} replaced by the real address
    (port 0 picks a free port)."""
    runner = web.AppRunner(app, access_log_class=ProbeQuietAccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(banner.format(url=f"http://{host}:{port}/v1"), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()


def _request_id(request: web.Request, chat: bool) -> str:
    """A unique id naming the request in the router's and the instances' logs, returned in the response's
    X-Request-Id header: the client's X-Request-Id (printable, up to 64 characters) plus a unique suffix,
    or a fresh one."""
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= 64 and given.isprintable() and " " not in given:
        return f"{given}.{uuid.uuid4().hex[:8]}"
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"


def _text(tokenizer: Tokenizer | None, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer else ""


def _chunk(request_id, created, model, chat, ids, text, reason, with_ids) -> dict:
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason}
    if with_ids:
        choice["token_ids"] = ids
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}


def _final(request_id, created, model, chat, ids, tokenizer, reason, with_ids, prompt_tokens) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": _text(tokenizer, ids)},
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": _text(tokenizer, ids), "finish_reason": reason}
    if with_ids:
        choice["token_ids"] = ids
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                      "total_tokens": prompt_tokens + len(ids)}}

