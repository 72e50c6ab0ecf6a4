"""The router: the OpenAI-compatible HTTP front of a PD cluster (or of colocated instances).

    python -m moe_pd.serve.router 'prefill=[tcp://127.0.0.1:9100]' 'decode=[tcp://127.0.0.1:9200]' port=8000

A request is tokenized and checked here, then:
1. decode: the decode instance with the most free KV pages reserves pages on one of its ranks (its leader
   picks the rank) and answers with that rank's KV address;
2. prefill: the prefill instance that caches the longest prefix of the prompt, on its ranks' device pages
   or in its node's DRAM and disk tiers, as the instances report what their caches stored and evicted
   (moe_pd.serve.cache_index; then the shortest queue), runs it and ships its KV straight to that decode
   rank;
3. the decode rank streams the tokens back through its leader to here, and on to the client.
A request waits at the router (bounded) while no instance has room for it. A KV transfer that fails, or an
instance that goes down, frees the request's pages everywhere; the request is run again from prefill with
the tokens already streamed appended (migration: the client's stream continues), up to `migration_limit`
times. A client that disconnects has its request aborted on every instance. An instance that misses its
heartbeats is marked down (/health: degraded, naming it) until it answers again, e.g. once restarted.
Flows: moe_pd.serve.router_flow.
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
from moe_pd.engine.core.request import pages_needed
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.log import setup_logging
from moe_pd.serve import protocol as p
from moe_pd.serve.backend import Job, Stream
from moe_pd.serve.balancer import pick_prefill_instance
from moe_pd.serve.cache_index import CacheIndex, prompt_keys
from moe_pd.serve.http_app import FRONT, build_app, serve_until_signalled
from moe_pd.serve.instance_client import InstanceClient
from moe_pd.serve.metrics import Metrics
from moe_pd.serve.openai_api import APIError
from moe_pd.serve.router_flow import Flow
from moe_pd.serve.router_requests import Phase, RouterRequests

log = logging.getLogger("moe_pd.serve.router")


class ClusterBackend:
    """The HTTP app's backend over the cluster's instances (see the module docstring). Every request
    attempt is a record in `requests` (moe_pd.serve.router_requests); each request's flow is a
    moe_pd.serve.router_flow.Flow."""

    def __init__(self, cfg: RouterConfig, max_context: int = 2**31) -> None:
        self.cfg, self.max_context = cfg, max_context
        self.context = zmq.asyncio.Context()
        self.requests = RouterRequests()
        client = lambda address, role: InstanceClient(address, role, self.context, cfg.heartbeat_timeout_s,
                                                      self._on_message, self._on_down)
        self.prefill = [client(a, "prefill") for a in cfg.prefill]
        self.decode = [client(a, "decode") for a in cfg.decode]
        self.colocated = [client(a, "colocated") for a in cfg.colocated]
        self.instances = self.prefill + self.decode + self.colocated
        self.metrics = Metrics()
        self.cache = CacheIndex()
        """What every instance's device pages and every node's tiers hold, from the instances' reports."""
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
    def submit(self, stream: Stream, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._run(stream, job))
        self.requests.tasks[stream.request_id] = task

    def abort(self, request_id: str) -> None:
        task = self.requests.tasks.get(request_id)
        if task is not None:
            task.cancel()

    def health(self) -> tuple[bool, dict]:
        roles = {inst.role for inst in self.instances}
        serving = all(any(i.up for i in self.instances if i.role == role) for role in roles)
        down = [inst.address for inst in self.instances if not inst.up]
        status = "ok" if not down else ("degraded" if serving else "unavailable")
        return serving, {"status": status, "down": down,
                         "draining": [inst.address for inst in self.instances if inst.up and inst.draining],
                         "waiting": self.requests.count(Phase.WAITING),
                         "instances": [inst.describe() for inst in self.instances]}

    def _on_message(self, inst: InstanceClient, msg: p.LeaderMessage) -> None:
        if isinstance(msg, p.Cached):
            self._observe_cache(inst, msg)
        else:
            self.requests.deliver(inst, msg)

    def _on_down(self, inst: InstanceClient) -> None:
        self.cache.forget(("device", inst.address))  # a restart starts with an empty device cache
        self.requests.instance_down(inst)

    def _observe_cache(self, inst: InstanceClient, msg: p.Cached) -> None:
        if msg.snapshot:
            self.cache.forget(("device", inst.address))
        domains = inst.status.tier_domains if inst.status is not None else {}
        for ev in msg.events:
            owner = ("device", inst.address) if ev.tier == "device" else (ev.tier, domains.get(ev.tier, ""))
            if owner[1]:
                self.cache.apply(owner, ev.stored, ev.removed, counted=ev.tier == "device")

    def cached_prefix(self, prompt_ids: list[int], instances: list[InstanceClient]) -> dict[str, int]:
        """instance -> prompt tokens it (its device pages, or its node's DRAM or disk tier) holds."""
        status = next((i.status for i in instances if i.status is not None and i.status.cache_root), None)
        if status is None:
            return {}
        keys = prompt_keys(status.cache_root, prompt_ids, status.block_size)
        out = {}
        for inst in instances:
            domains = inst.status.tier_domains if inst.status is not None else {}
            owners = [("device", inst.address), *((tier, d) for tier, d in domains.items())]
            same = inst.status is not None and inst.status.cache_root == status.cache_root
            out[inst.address] = self.cache.run(keys, owners) * status.block_size if same else 0
        return out

    def refresh(self, metrics: Metrics) -> None:
        for inst in self.instances:
            metrics.instance(inst.address, inst.role, inst.up, inst.describe()["ranks"], inst.eplb)
        metrics.router(self.requests.count(Phase.WAITING), len(self.requests.attempts))

    # choosing instances (the flows ask) ---------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        """The prefill instances' page size (Reserve counts pages in each decode instance's own)."""
        return next((i.block_size for i in self.prefill if i.up), 64)

    @staticmethod
    def _usable(inst) -> bool:
        """Up, not draining, and heard from since it last refused a reservation for room."""
        return inst.up and not getattr(inst, "draining", False) and \
            getattr(inst, "status_at", 1.0) > getattr(inst, "refused_at", 0.0)

    def pick_colocated(self, prompt_ids: list[int] | None = None):
        """The usable colocated instance that caches the prompt's longest prefix (device pages or its node's
        tiers, as reported), then the one with the most free pages; None while there is none."""
        live = [inst for inst in self.colocated if self._usable(inst)]
        cached = self.cached_prefix(prompt_ids, live) if prompt_ids and live else {}
        return max(live, key=lambda inst: (cached.get(inst.address, 0), inst.free_pages)) if live else None

    def pick_pd(self, prompt_len: int, max_tokens: int):
        """(decode instance, prefill instances) for a request: the decode instance with the most free pages
        among those with a rank that has room for the request at its longest (in that instance's own page
        size: prefill and decode may differ), and the prefill instances up; None while there is none."""
        decodes = [inst for inst in self.decode if self._usable(inst) and getattr(inst, "rank_room", 1 << 62)
                   >= pages_needed(prompt_len, max_tokens, inst.block_size, self.max_context)]
        prefills = [inst for inst in self.prefill if inst.up and not getattr(inst, "draining", False)]
        if not decodes or not prefills:
            return None
        return max(decodes, key=lambda inst: inst.free_pages), prefills

    # request flows ----------------------------------------------------------------------------------------
    async def _run(self, stream: Stream, job: Job) -> None:
        try:
            await Flow(self, stream, job).run()
        except APIError as exc:
            stream.put(exc)
        except asyncio.CancelledError:
            pass  # aborted: the attempt's end told the instances
        except Exception:  # a bug here must not hang the client
            log.exception("request %s failed", stream.request_id)
            stream.put(APIError("internal error", 500, kind="server_error"))
        finally:
            self.requests.tasks.pop(stream.request_id, None)

    def pick_prefill(self, prefills, prompt_ids: list[int]):
        """The prefill instance among `prefills` that caches the prompt's longest prefix, on its ranks' device
        pages or in its node's tiers, as the instances reported it (then the shortest queue)."""
        live = {inst.address: inst for inst in prefills}
        cached = self.cached_prefix(prompt_ids, prefills)
        chosen = pick_prefill_instance(cached, {a: inst.queued_tokens for a, inst in live.items()})
        return live[chosen]

    def observe_transfer(self, msg: p.Prefilled) -> None:
        if msg.state == "done":
            self.metrics.transfer_bytes.labels(msg.backend).inc(msg.nbytes)
            self.metrics.transfer_seconds.labels(msg.backend).observe(msg.latency_s)


async def serve(cfg: RouterConfig) -> None:
    model_cfg = resolve_model_config(cfg.model)
    backend, metrics = ClusterBackend(cfg, model_cfg.max_position_embeddings), Metrics()
    app = build_app(backend, load_tokenizer(model_cfg), cfg.served_model_name, cfg.max_tokens_limit,
                    model_cfg.vocab_size, model_cfg.max_position_embeddings, metrics, cfg.max_body_bytes)
    app[FRONT].retry_after_s = cfg.retry_after_s
    await backend.start(metrics)
    try:
        await serve_until_signalled(app, cfg.host, cfg.port, f"moe_pd router for {cfg.served_model_name} at {{url}}",
                                    cfg.drain_timeout_s)
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
