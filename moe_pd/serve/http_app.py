"""The OpenAI-compatible HTTP app over a Backend: one engine in this process (moe_pd.serve.api_server) or a
PD cluster (moe_pd.serve.router).

Endpoints: POST /v1/completions and /v1/chat/completions (moe_pd.serve.completions), POST /tokenize and
/detokenize (as vLLM and SGLang offer them), GET /v1/models, /health, /metrics (Prometheus). Every error,
whatever its status (400, 404, 405, 413, 500, 503), has an OpenAI-style JSON body; a 503 carries Retry-After.

SIGTERM or SIGINT drains: new requests get 503 with Retry-After and /health says "draining" (503, so load
balancers stop sending), requests in flight finish for up to `drain_timeout_s`, then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from aiohttp.web_log import AccessLogger
from prometheus_client import generate_latest

from moe_pd.engine.tokenizer import Tokenizer
from moe_pd.serve.backend import Backend
from moe_pd.serve.completions import Front, generate
from moe_pd.serve.metrics import Metrics
from moe_pd.serve.openai_api import APIError, decode_body, flag, render_chat, token_id_list

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
"""Largest request body (413 above)."""

FRONT = web.AppKey("front", Front)

_STATUS_KINDS = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error as an OpenAI-style JSON body: APIErrors, aiohttp's own (404, 405, 413) and bugs (500)."""
    try:
        return await handler(request)
    except APIError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = APIError(exc.reason if exc.status != 413 else f"the request body is larger than {MAX_BODY_BYTES} bytes",
                         exc.status, kind=_STATUS_KINDS.get(exc.status, "invalid_request_error"))
        return web.json_response(error.body(), status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")})
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(APIError("internal error", 500, kind="server_error").body(), status=500)


def build_app(backend: Backend, tokenizer: Tokenizer | None, model_name: str, max_tokens_limit: int,
              vocab_size: int, max_context: int, metrics: Metrics | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    """The HTTP app over a backend: an engine in this process (EngineLoop) or a PD cluster (router)."""
    front = Front(backend, tokenizer, model_name, max_tokens_limit, vocab_size, max_context, metrics or Metrics())
    front.idle.set()
    app = web.Application(middlewares=[json_errors], client_max_size=max_body_bytes)
    app[FRONT] = front

    async def completions(request):
        return await generate(front, request, chat=False)

    async def chat_completions(request):
        return await generate(front, request, chat=True)

    async def tokenize(request):
        body = decode_body(await request.read())
        if not isinstance(body, dict) or set(body) - {"model", "prompt", "messages", "add_special_tokens",
                                                        "add_generation_prompt"}:
            raise APIError("/tokenize takes 'prompt' or 'messages' (and 'model', 'add_special_tokens')")
        if tokenizer is None:
            raise APIError("this model has no tokenizer")
        if isinstance(body.get("prompt"), str) and "messages" not in body:
            text = body["prompt"]
            render_chat([{"role": "user", "content": text}])  # the same Unicode checks
        elif "messages" in body and "prompt" not in body:
            text = render_chat(body["messages"])
        else:
            raise APIError("/tokenize takes a string 'prompt' or a list of 'messages'", param="prompt")
        ids = tokenizer.encode(text, add_bos=flag(body, "add_special_tokens", True))
        return web.json_response({"count": len(ids), "max_model_len": max_context, "tokens": ids})

    async def detokenize(request):
        body = decode_body(await request.read())
        if not isinstance(body, dict) or set(body) - {"model", "tokens"}:
            raise APIError("/detokenize takes 'tokens' (and 'model')")
        ids = token_id_list(body.get("tokens"), "tokens")
        if tokenizer is None:
            raise APIError("this model has no tokenizer")
        if any(t >= vocab_size for t in ids):
            raise APIError(f"'tokens' has ids outside [0, {vocab_size})", param="tokens")
        text = tokenizer.decode(ids)
        return web.json_response({"prompt": text, "text": text})

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": model_name, "object": "model",
                                                              "owned_by": "moe_pd", "max_model_len": max_context}]})

    async def health(_):
        ok, body = backend.health()
        if front.draining:
            ok, body = False, {**body, "status": "draining"}
        return web.json_response(body, status=200 if ok else 503)

    async def prometheus(_):
        backend.refresh(front.metrics)
        return web.Response(body=generate_latest(front.metrics.registry), content_type="text/plain")

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    return app


class ProbeQuietAccessLogger(AccessLogger):
    """aiohttp's access log without /health and /metrics, which load balancers and Prometheus poll."""

    def log(self, request, response, time: float) -> None:
        if request.path not in ("/health", "/metrics"):
            super().log(request, response, time)


async def drain(app: web.Application, timeout_s: float) -> bool:
    """Stops admission and waits up to `timeout_s` for the requests in flight; True when they all finished."""
    front = app[FRONT]
    front.draining = True
    log.info("draining: %d request(s) in flight, up to %.0f s", front.in_flight, timeout_s)
    try:
        await asyncio.wait_for(front.idle.wait(), timeout_s)
        return True
    except asyncio.TimeoutError:
        log.warning("drain timeout: %d request(s) still in flight are cut off", front.in_flight)
        return False


async def serve_until_signalled(app: web.Application, host: str, port: int, banner: str,
                                drain_timeout_s: float = 30.0) -> None:
    """Serves `app` until SIGINT or SIGTERM, then drains (`drain`) and stops. `banner` is printed with {url}
    replaced by the real address (port 0 picks a free port)."""
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
    await drain(app, drain_timeout_s)
    log.info("shutting down")
    await runner.cleanup()
