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
import json
import logging
import time

import hydra
import zmq
import zmq.asyncio
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.serve import RouterConfig
from moe_pd.config.store import register_configs, to_config
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.log import setup_logging
from moe_pd.serve.backend import Stream
from moe_pd.serve.balancer import PrefixIndex, pick_prefill_instance
from moe_pd.serve.http_app import build_app, serve_until_signalled
from moe_pd.serve.metrics import Metrics
from moe_pd.serve.openai_api import APIError, GenerationRequest

log = logging.getLogger("moe_pd.serve.router")

DOWN = {"op": "down"}


class InstanceClient:
    """The router's connection to one instance's leader: sends commands, routes the answers to the
    requests listening for them, and keeps the instance's latest status (its heartbeat)."""

    def __init__(self, address: str, role: str, context: zmq.asyncio.Context, timeout_s: float) -> None:
        self.address, self.role, self.timeout_s = address, role, timeout_s
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.status: dict = {}
        self.last_seen: float | None = None
        self.listeners: dict[str, asyncio.Queue] = {}
        self._was_up = False

    @property
    def up(self) -> bool:
        """Answering heartbeats, with its ranks reporting."""
        return (self.last_seen is not None and time.monotonic() - self.last_seen < self.timeout_s
                and bool(self.ranks))

    @property
    def ranks(self) -> list[dict]:
        return self.status.get("ranks", [])

    @property
    def free_pages(self) -> int:
        return sum(r["kv_total"] - r["kv_used"] for r in self.ranks)

    @property
    def queued_tokens(self) -> int:
        return sum(r["queued_tokens"] for r in self.ranks)

    def send(self, msg: dict) -> None:
        """Never blocks: toward an instance that is down, messages queue up to the socket's limit, then
        are dropped (the instance then has nothing of ours to act on)."""
        try:
            self.socket.send(json.dumps(msg).encode(), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("%s instance %s: send queue full, dropped %s", self.role, self.address, msg["op"])

    def listen(self, rid: str, queue: asyncio.Queue) -> None:
        self.listeners[rid] = queue

    def forget(self, rid: str) -> None:
        self.listeners.pop(rid, None)

    async def receive(self) -> None:
        while True:
            msg = json.loads(await self.socket.recv())
            self.last_seen = time.monotonic()
            if msg["op"] == "status":
                self.status = msg
                if self.up and not self._was_up:
                    log.info("%s instance %s is up (%d ranks)", self.role, self.address, len(self.ranks))
                    self._was_up = True
                continue
            queue = self.listeners.get(msg.get("rid"))
            if queue is not None:
                queue.put_nowait((self, msg))

    async def watch(self) -> None:
        """Says hello until the instance answers (again), and fails its requests once it falls silent."""
        while True:
            if not self.up:
                if self._was_up:
                    self._was_up = False
                    log.error("%s instance %s missed its heartbeats for %.1f s: marked down", self.role,
                              self.address, self.timeout_s)
                    for queue in self.listeners.values():
                        queue.put_nowait((self, DOWN))
                    self.listeners.clear()
                self.send({"op": "hello"})
            await asyncio.sleep(min(0.5, self.timeout_s / 4))

    def describe(self) -> dict:
        return {"name": self.address, "role": self.role, "up": self.up, "ranks": self.ranks}


class ClusterBackend:
    """The HTTP app's backend over the cluster's instances (see the module docstring)."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.context = zmq.asyncio.Context()
        client = lambda address, role: InstanceClient(address, role, self.context, cfg.heartbeat_timeout_s)
        self.prefill = [client(a, "prefill") for a in cfg.prefill]
        self.decode = [client(a, "decode") for a in cfg.decode]
        self.colocated = [client(a, "colocated") for a in cfg.colocated]
        self.instances = self.prefill + self.decode + self.colocated
        self.metrics: Metrics | None = None
        self.prefix: PrefixIndex | None = None
        self._requests: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self, metrics: Metrics) -> None:
        self.metrics = metrics
        for inst in self.instances:
            self._tasks += [asyncio.create_task(inst.receive()), asyncio.create_task(inst.watch())]

    async def close(self) -> None:
        for task in [*self._requests.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._requests.values(), *self._tasks, return_exceptions=True)
        for inst in self.instances:
            inst.socket.close(0)
        self.context.term()

    # the Backend contract ---------------------------------------------------------------------------------
    def submit(self, stream: Stream, request: GenerationRequest) -> None:
        serve = self._colocated if self.colocated else self._disaggregated
        task = asyncio.get_running_loop().create_task(self._run(serve, stream, request))
        self._requests[stream.request_id] = task

    def abort(self, request_id: str) -> None:
        task = self._requests.get(request_id)
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
            metrics.instance(inst.address, inst.role, inst.up, inst.ranks, inst.status.get("eplb"))

    # request flows ----------------------------------------------------------------------------------------
    async def _run(self, serve, stream: Stream, request: GenerationRequest) -> None:
        try:
            await serve(stream, request)
        except APIError as exc:
            stream.tokens.put_nowait(exc)
        except asyncio.CancelledError:
            pass  # aborted: `serve` told the instances
        except Exception as exc:  # a bug here must not hang the client
            log.exception("request %s failed", stream.request_id)
            stream.tokens.put_nowait(APIError(f"router failure: {exc}", 500, kind="server_error"))
        finally:
            self._requests.pop(stream.request_id, None)

    async def _next(self, queue: asyncio.Queue) -> tuple[InstanceClient, dict]:
        try:
            return await asyncio.wait_for(queue.get(), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(f"no progress from the cluster in {self.cfg.request_timeout_s:.0f} s", 504,
                           kind="server_error") from None

    @staticmethod
    def _spec(rid: str, request: GenerationRequest, op: str) -> dict:
        p = request.params
        return {"op": op, "rid": rid, "prompt": request.prompt_ids, "max_tokens": request.max_tokens,
                "params": {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p},
                "seed": request.seed, "ignore_eos": request.ignore_eos}

    def _pick_prefill(self, prompt_ids: list[int]) -> InstanceClient:
        live = {inst.address: inst for inst in self.prefill if inst.up}
        if not live:
            raise APIError("no prefill instance is up", 503, kind="server_error")
        if self.prefix is None:
            self.prefix = PrefixIndex(next(iter(live.values())).status.get("block_size", 64))
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
        rid = f"{stream.request_id}.0"
        queue: asyncio.Queue = asyncio.Queue()
        inst.listen(rid, queue)
        try:
            inst.send(self._spec(rid, request, "generate"))
            while True:
                _, msg = await self._next(queue)
                if msg["op"] == "down":
                    raise APIError(f"colocated instance {inst.address} went down", 503, kind="server_error")
                if msg["op"] == "error":
                    raise APIError(msg["message"], msg.get("status", 400 if not msg["retry"] else 503))
                stream.tokens.put_nowait((msg["ids"], msg["finished"], msg["reason"]))
                if msg["finished"]:
                    return
        except asyncio.CancelledError:
            inst.send({"op": "abort", "rid": rid})
            raise
        finally:
            inst.forget(rid)

    async def _disaggregated(self, stream: Stream, request: GenerationRequest) -> None:
        failed_ranks: set[str] = set()
        failed_instances: set[str] = set()
        for attempt in range(2):  # a failed KV transfer is re-run once, away from the rank that failed
            rid = f"{stream.request_id}.{attempt}"
            retry = await self._attempt(stream, request, rid, failed_ranks, failed_instances, last=attempt == 1)
            if not retry:
                return
            self.metrics.retries.inc()
            log.warning("request %s: %s; re-running it once on another decode rank", stream.request_id, retry)

    async def _attempt(self, stream: Stream, request: GenerationRequest, rid: str, failed_ranks: set[str],
                       failed_instances: set[str], last: bool) -> str | None:
        """One try of a PD request. Returns why it should be re-run (None: it finished)."""
        queue: asyncio.Queue = asyncio.Queue()
        decode = self._pick_least_loaded(self.decode, failed_instances)
        prefill: InstanceClient | None = None
        started = False  # tokens reached the client: never re-run from here on
        decode.listen(rid, queue)
        try:
            decode.send({**self._spec(rid, request, "reserve"), "exclude": sorted(failed_ranks)})
            source, msg = await self._next(queue)
            if msg["op"] == "down":
                raise APIError(f"decode instance {decode.address} went down", 503, kind="server_error")
            if msg["op"] == "error":
                if msg["retry"] and not last:
                    failed_instances.add(decode.address)
                    return msg["message"]
                raise APIError(msg["message"], msg.get("status", 503 if msg["retry"] else 400),
                               kind="server_error" if msg["retry"] else "invalid_request_error")
            address = msg["address"]
            prefill = self._pick_prefill(request.prompt_ids)
            prefill.listen(rid, queue)
            prefill.send({**self._spec(rid, request, "prefill"), "decode": address})
            while True:
                source, msg = await self._next(queue)
                op = msg["op"]
                if op == "tokens":
                    started = True
                    stream.tokens.put_nowait((msg["ids"], msg["finished"], msg["reason"]))
                    if msg["finished"]:
                        return None
                elif op == "prefilled":
                    self._observe_transfer(msg)
                    prefill.forget(rid)
                    if msg["state"] != "done":
                        why = f"KV transfer {msg['state']}: {msg['detail']}"
                        decode.send({"op": "abort", "rid": rid})
                        return self._retry_or_fail(why, started, last, failed_ranks, address)
                elif op == "error":
                    if source is decode and msg["retry"]:
                        if prefill is not None:
                            prefill.send({"op": "abort", "rid": rid})
                        return self._retry_or_fail(msg["message"], started, last, failed_ranks, address)
                    raise APIError(msg["message"], msg.get("status", 400))
                elif op == "down":
                    if source is decode or started:
                        raise APIError(f"{source.role} instance {source.address} went down", 503, kind="server_error")
                    decode.send({"op": "abort", "rid": rid})  # prefill died before shipping: start over
                    return self._retry_or_fail(f"prefill instance {source.address} went down", started, last,
                                               set(), "")
        except BaseException:  # aborted by the client, or failed: nothing of this attempt may keep pages
            for inst in (decode, prefill):
                if inst is not None and inst.up:
                    inst.send({"op": "abort", "rid": rid})
            raise
        finally:
            decode.forget(rid)
            if prefill is not None:
                prefill.forget(rid)

    @staticmethod
    def _retry_or_fail(why: str, started: bool, last: bool, failed_ranks: set[str], address: str) -> str:
        if started or last:
            raise APIError(f"the request failed: {why}", 503, kind="server_error")
        if address:
            failed_ranks.add(address)
        return why

    def _observe_transfer(self, msg: dict) -> None:
        if msg["state"] == "done":
            self.metrics.transfer_bytes.inc(msg["nbytes"])
            self.metrics.transfer_seconds.observe(msg["latency_s"])


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
