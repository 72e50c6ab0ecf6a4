"""The router: the OpenAI-compatible HTTP front of a PD cluster (or of colocated instances).

    python -m moe_pd.serve.router 'prefill=[tcp://127.0.0.1:9100]' 'decode=[tcp://127.0.0.1:9200]' port=8000

A request is tokenized and checked here, then:
1. decode: the decode instance with the most free KV pages reserves pages on one of its ranks (its leader
   picks the rank) and answers with that rank's KV address;
2. prefill: the prefill instance that probably caches the longest prefix of the prompt (then the shortest
   queue) runs it and ships its KV straight to that decode rank;
3. the decode rank streams the tokens back through its leader to here, and on to the client.
A KV transfer that fails or times out frees its pages on both sides; the request is then re-run once with
another decode rank, else fails with an error. A client that disconnects has its request aborted on every
instance. An instance that misses its heartbeats is marked down: its requests fail with 503, new requests
go to the others (or get 503), and /health reports the cluster degraded.
"""

from __future__ import annotations

import asyncio
import logging

import hydra
import zmq.asyncio
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.serve import RouterConfig
from moe_pd.config.store import register_configs, to_config
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.log import setup_logging
from moe_pd.serve import protocol as p
from moe_pd.serve.backend import Stream
from moe_pd.serve.balancer import PrefixIndex, pick_prefill_instance
from moe_pd.serve.http_app import build_app, serve_until_signalled
from moe_pd.serve.instance_client import InstanceClient
from moe_pd.serve.metrics import Metrics
from moe_pd.serve.openai_api import APIError, GenerationRequest
from moe_pd.serve.router_requests import DOWN, Attempt, Phase, RouterRequests

log = logging.getLogger("moe_pd.serve.router")


class ClusterBackend:
    """The HTTP app's backend over the cluster's instances (see the module docstring). Every request
    attempt is a record in `requests` (moe_pd.serve.router_requests)."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.context = zmq.asyncio.Context()
        self.requests = RouterRequests()
        client = lambda address, role: InstanceClient(address, role, self.context, cfg.heartbeat_timeout_s,
                                                      self.requests.deliver, self.requests.instance_down)
        self.prefill = [client(a, "prefill") for a in cfg.prefill]
        self.decode = [client(a, "decode") for a in cfg.decode]
        self.colocated = [client(a, "colocated") for a in cfg.colocated]
        self.instances = self.prefill + self.decode + self.colocated
        self.metrics = Metrics()
        self.prefix: PrefixIndex | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self, metrics: Metrics) -> None:
        self.metrics = metrics
        for inst in self.instances:
            self._tasks += [asyncio.create_task(inst.receive()), asyncio.create_task(inst.watch())]

    async def close(self) -> None:
        requests = list(self.requests.tasks.values())
        for task in [*requests, *self._tasks]:
            task.cancel()
        await asyncio.gather(*requests, *self._tasks, return_exceptions=True)
        for inst in self.instances:
            inst.socket.close(0)
        self.context.term()

    # the Backend contract ---------------------------------------------------------------------------------
    def submit(self, stream: Stream, request: GenerationRequest) -> None:
        serve = self._colocated if self.colocated else self._disaggregated
        task = asyncio.get_running_loop().create_task(self._run(serve, stream, request))
        self.requests.tasks[stream.request_id] = task

    def abort(self, request_id: str) -> None:
        task = self.requests.tasks.get(request_id)
        if task is not None:
            task.cancel()

    def health(self) -> tuple[bool, dict]:
        roles = {inst.role for inst in self.instances}
        serving = all(any(i.up for i in self.instances if i.role == role) for role in roles)
        everyone = all(inst.up for inst in self.instances)
        status = "ok" if everyone else ("degraded" if serving else "unavailable")
        return serving, {"status": status, "instances": [inst.describe() for inst in self.instances]}

    def refresh(self, metrics: Metrics) -> None:
        for inst in self.instances:
            metrics.instance(inst.address, inst.role, inst.up, inst.describe()["ranks"], inst.eplb)

    # request flows ----------------------------------------------------------------------------------------
    async def _run(self, serve, stream: Stream, request: GenerationRequest) -> None:
        try:
            await serve(stream, request)
        except APIError as exc:
            stream.tokens.put_nowait(exc)
        except asyncio.CancelledError:
            pass  # aborted: the attempt's end told the instances
        except Exception as exc:  # a bug here must not hang the client
            log.exception("request %s failed", stream.request_id)
            stream.tokens.put_nowait(APIError(f"router failure: {exc}", 500, kind="server_error"))
        finally:
            self.requests.tasks.pop(stream.request_id, None)

    async def _next(self, attempt: Attempt):
        try:
            return await asyncio.wait_for(attempt.inbox.get(), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(f"no progress from the cluster in {self.cfg.request_timeout_s:.0f} s", 504,
                           kind="server_error") from None

    @staticmethod
    def _spec(kind, rid: str, request: GenerationRequest, **extra):
        return kind(rid, request.prompt_ids, request.max_tokens, request.params, request.seed, request.ignore_eos,
                    **extra)

    def _pick_prefill(self, prompt_ids: list[int]) -> InstanceClient:
        live = {inst.address: inst for inst in self.prefill if inst.up}
        if not live:
            raise APIError("no prefill instance is up", 503, kind="server_error")
        if self.prefix is None:
            self.prefix = PrefixIndex(next(iter(live.values())).block_size)
        cached = self.prefix.match(prompt_ids, list(live))
        chosen = pick_prefill_instance(cached, {a: inst.queued_tokens for a, inst in live.items()})
        self.prefix.insert(chosen, prompt_ids)
        return live[chosen]

    def _pick_least_loaded(self, instances: list[InstanceClient], exclude: set[str]) -> InstanceClient:
        live = [inst for inst in instances if inst.up]
        if not live:
            raise APIError(f"no {instances[0].role} instance is up", 503, kind="server_error")
        return max(live, key=lambda inst: (inst.address not in exclude, inst.free_pages))

    async def _colocated(self, stream: Stream, request: GenerationRequest) -> None:
        inst = self._pick_least_loaded(self.colocated, set())
        attempt = self.requests.open(stream.request_id, 0, Phase.PREFILLING)
        attempt.decode = inst
        ending = Phase.FAILED
        try:
            self.requests.send(attempt, inst, self._spec(p.Generate, attempt.rid, request))
            while True:
                _, msg = await self._next(attempt)
                if msg == DOWN:
                    raise APIError(f"colocated instance {inst.address} went down", 503, kind="server_error")
                if isinstance(msg, p.Error):
                    raise APIError(msg.message, msg.status)
                if attempt.phase is Phase.PREFILLING:
                    self.requests.transition(attempt, Phase.STREAMING)
                stream.tokens.put_nowait((msg.ids, msg.finished, msg.reason))
                if msg.finished:
                    ending = Phase.FINISHED
                    return
        except asyncio.CancelledError:
            ending = Phase.ABORTED
            raise
        finally:
            self.requests.end(attempt, ending)

    async def _disaggregated(self, stream: Stream, request: GenerationRequest) -> None:
        failed_ranks: set[str] = set()
        failed_instances: set[str] = set()
        for number in range(2):  # a failed KV transfer is re-run once, away from the rank that failed
            retry = await self._attempt(stream, request, number, failed_ranks, failed_instances, last=number == 1)
            if not retry:
                return
            self.metrics.retries.inc()
            log.warning("request %s: %s; re-running it once on another decode rank", stream.request_id, retry)

    async def _attempt(self, stream: Stream, request: GenerationRequest, number: int, failed_ranks: set[str],
                       failed_instances: set[str], last: bool) -> str | None:
        """One try of a PD request. Returns why it should be re-run (None: it finished)."""
        decode = self._pick_least_loaded(self.decode, failed_instances)
        attempt = self.requests.open(stream.request_id, number, Phase.RESERVING)
        attempt.decode = decode
        ending = Phase.FAILED
        try:
            self.requests.send(attempt, decode, self._spec(p.Reserve, attempt.rid, request,
                                                           exclude=sorted(failed_ranks)))
            _, msg = await self._next(attempt)
            if msg == DOWN:
                raise APIError(f"decode instance {decode.address} went down", 503, kind="server_error")
            if isinstance(msg, p.Error):
                if msg.retry and not last:
                    failed_instances.add(decode.address)
                    return msg.message
                raise APIError(msg.message, msg.status, kind="server_error" if msg.retry else "invalid_request_error")
            attempt.address = msg.address
            prefill = attempt.prefill = self._pick_prefill(request.prompt_ids)
            self.requests.transition(attempt, Phase.PREFILLING)
            self.requests.send(attempt, prefill, p.Prefill(attempt.rid, request.prompt_ids, msg.address,
                                                           request.params, request.seed))
            while True:
                source, msg = await self._next(attempt)
                if isinstance(msg, p.Tokens):
                    if attempt.phase is Phase.PREFILLING:
                        self.requests.transition(attempt, Phase.STREAMING)
                    stream.tokens.put_nowait((msg.ids, msg.finished, msg.reason))
                    if msg.finished:
                        ending = Phase.FINISHED
                        return None
                elif isinstance(msg, p.Prefilled):
                    self._observe_transfer(msg)
                    if msg.state != "done":
                        return self._retry_or_fail(attempt, f"KV transfer {msg.state}: {msg.detail}", last,
                                                   failed_ranks)
                elif isinstance(msg, p.Error):
                    if source is decode and msg.retry:
                        return self._retry_or_fail(attempt, msg.message, last, failed_ranks)
                    raise APIError(msg.message, msg.status)
                elif msg == DOWN:
                    if source is decode or attempt.phase is Phase.STREAMING:
                        raise APIError(f"{source.role} instance {source.address} went down", 503, kind="server_error")
                    attempt.address = ""  # prefill died before shipping: start over, any decode rank
                    return self._retry_or_fail(attempt, f"prefill instance {source.address} went down", last,
                                               failed_ranks)
        except asyncio.CancelledError:
            ending = Phase.ABORTED
            raise
        finally:
            self.requests.end(attempt, ending)  # FAILED/ABORTED: every instance still holding it is told

    @staticmethod
    def _retry_or_fail(attempt: Attempt, why: str, last: bool, failed_ranks: set[str]) -> str:
        if attempt.phase is Phase.STREAMING or last:
            raise APIError(f"the request failed: {why}", 503, kind="server_error")
        if attempt.address:
            failed_ranks.add(attempt.address)
        return why

    def _observe_transfer(self, msg: p.Prefilled) -> None:
        if msg.state == "done":
            self.metrics.transfer_bytes.inc(msg.nbytes)
            self.metrics.transfer_seconds.observe(msg.latency_s)


async def serve(cfg: RouterConfig) -> None:
    model_cfg = resolve_model_config(cfg.model)
    backend, metrics = ClusterBackend(cfg), Metrics()
    app = build_app(backend, load_tokenizer(model_cfg), cfg.served_model_name, cfg.max_tokens_limit,
                    model_cfg.vocab_size, model_cfg.max_position_embeddings, metrics)
    await backend.start(metrics)
    try:
        await serve_until_signalled(app, cfg.host, cfg.port, f"moe_pd router for {cfg.served_model_name} at {{url}}")
    finally:
        await backend.close()


@hydra.main(config_path="pkg://moe_pd.conf", config_name="router", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    with exit_on(ConfigError):
        cfg = to_config(dict_cfg)
        setup_logging(cfg.log_level)
        asyncio.run(serve(cfg))


register_configs()

if __name__ == "__main__":
    main()
