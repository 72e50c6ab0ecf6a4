"""One instance of a PD cluster (prefill, decode or colocated), run by every rank of a torchrun job:

    torchrun --nproc-per-node=2 -m moe_pd.serve.service --config-name prefill port=9100
    torchrun --nproc-per-node=4 -m moe_pd.serve.service --config-name decode port=9200

Rank 0, the leader, talks to routers over a ZeroMQ ROUTER socket and decides which DP rank serves each
request: prefill balances uncached prompt tokens and attention work, preferring the rank that caches the
prompt's prefix; decode and colocated balance KV usage and running requests (DeepSeek's load balancers).

Every loop iteration the ranks exchange one control message each over a gloo group (`all_gather_object`):
the leader's carries every rank's commands, every rank's carries its events and its load. If any rank has
engine work, all ranks then run one engine step together: an idle rank runs an empty forward, so every MoE
all-to-all stays paired. The decision is taken from the exchanged messages only, so it is the same on
every rank.

Messages are JSON objects with an "op":
  router -> leader: hello | prefill {rid, prompt, params, seed, decode} | reserve {rid, prompt, max_tokens,
                    params, seed, ignore_eos, exclude} | generate {rid, prompt, max_tokens, params, seed,
                    ignore_eos} | abort {rid}
  leader -> router: status {service, role, block_size, ranks} every heartbeat_s | reserved {rid, address} |
                    tokens {rid, ids, finished, reason} | prefilled {rid, state, detail, nbytes, latency_s} |
                    error {rid, message, retry}
"prefill" runs a prompt and ships its KV to the decode rank at `decode`; "reserve" takes pages on a decode
rank (the answer names the rank's KV address, which the router hands to prefill); "generate" is both
phases on a colocated instance.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import hydra
import torch
import torch.distributed as dist
import zmq
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.serve import ServiceConfig
from moe_pd.config.store import register_configs, to_config
from moe_pd.engine.core.request import SamplingParams
from moe_pd.engine.disagg import DecodeWorker, PrefillWorker
from moe_pd.engine.instance import build_instance_model, graphs_wanted, start_watchdog
from moe_pd.engine.llm_engine import LLMEngine, RequestOutput
from moe_pd.kvcache.block_manager import OutOfBlocks
from moe_pd.kvcache.transfer.zmq_transport import KVReceiver, KVSender
from moe_pd.log import setup_logging
from moe_pd.model.loader import CheckpointError
from moe_pd.parallel.flight_recorder import FlightRecorder
from moe_pd.parallel.state import init_parallel, shutdown
from moe_pd.parallel.step_sync import StepSync
from moe_pd.profiling.profiler import RankProfiler
from moe_pd.runtime import resolve_device, resolve_dtype
from moe_pd.serve.balancer import DecodeRankLoad, PrefillRankLoad, PrefixIndex, assign_prefill, pick_decode_rank

log = logging.getLogger("moe_pd.serve.service")


@dataclass
class RankLoad:
    """What a rank reports every iteration: the leader balances on it, routers see it in `status`."""

    rank: int
    kv_used: int
    kv_total: int
    running: int
    waiting: int
    queued_tokens: int
    """Prompt tokens admitted and not yet computed."""
    max_running: int
    address: str = ""
    """Decode ranks: where prefill ships this rank's KV."""
    in_transfer: int = 0
    """Requests whose KV is on the wire (sent by prefill, or expected by decode)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache since start-up."""
    aborted: int = 0
    """Requests aborted since start-up."""
    pid: int = 0
    """The rank's process id."""
    transfers: dict[str, int] = field(default_factory=dict)
    """Prefill ranks: KV transfers finished since start-up, by final state (done, timed_out, rejected,
    cancelled: aborted while on the wire)."""


def sampling(params: dict) -> SamplingParams:
    return SamplingParams(params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0))


class RankWorker:
    """One rank's requests: applies the leader's commands, steps, and reports events and load."""

    def __init__(self, cfg: ServiceConfig, engine: LLMEngine, rank: int) -> None:
        self.engine, self.rank, self.max_running = engine, rank, cfg.max_num_seqs
        self.transfers: Counter[str] = Counter()
        self.prefill = self.decode = None
        if cfg.role == "prefill":
            self.prefill = PrefillWorker(engine, KVSender(f"prefill-{rank}"), cfg.kv_timeout_s,
                                         cfg.fault_drop_kv_transfers if rank == 0 else 0)
        elif cfg.role == "decode":
            receiver = KVReceiver(engine.cache.kv_LPSW, bind=f"tcp://{cfg.kv_host}:*")
            if cfg.advertise_host:
                receiver.address = receiver.address.replace(f"//{cfg.kv_host}:", f"//{cfg.advertise_host}:")
            self.decode = DecodeWorker(engine, receiver, cfg.kv_timeout_s)

    @property
    def engine_busy(self) -> bool:
        scheduler = self.engine.scheduler
        return bool(scheduler.running or scheduler.waiting)

    def load(self) -> RankLoad:
        scheduler = self.engine.scheduler
        queued = sum(s.num_uncomputed for s in (*scheduler.waiting, *scheduler.running) if s.is_prefill)
        transit = len(self.prefill.sender.in_flight) if self.prefill else len(scheduler.receiving)
        return RankLoad(self.rank, self.engine.allocator.num_used, self.engine.allocator.num_blocks,
                        len(scheduler.running) + len(scheduler.receiving), len(scheduler.waiting), queued,
                        self.max_running, self.decode.address if self.decode else "", transit,
                        scheduler.cached_tokens, scheduler.aborted, os.getpid(), dict(self.transfers))

    def apply(self, cmd: dict) -> list[dict]:
        op, rid = cmd["op"], cmd.get("rid")
        try:
            if op == "abort":
                if self.prefill:
                    if self.prefill.cancel(rid) is not None:
                        self.transfers["cancelled"] += 1
                elif self.decode:
                    self.decode.abort(rid)
                else:
                    self.engine.abort(rid)
            elif op == "prefill":
                self.prefill.submit(rid, cmd["prompt"], cmd["decode"], sampling(cmd["params"]), cmd.get("seed"))
            elif op == "reserve":
                self.decode.reserve(rid, cmd["prompt"], cmd["max_tokens"], sampling(cmd["params"]), cmd.get("seed"),
                                    cmd.get("ignore_eos", False))
                return [{"op": "reserved", "rid": rid, "address": self.decode.address, "rank": self.rank}]
            elif op == "generate":
                self.engine.add_request(rid, cmd["prompt"], cmd["max_tokens"], sampling(cmd["params"]),
                                        cmd.get("seed"), cmd.get("ignore_eos", False))
        except OutOfBlocks as exc:
            return [{"op": "error", "rid": rid, "message": f"rank {self.rank}: {exc}", "retry": True}]
        except ValueError as exc:
            return [{"op": "error", "rid": rid, "message": str(exc), "retry": False}]
        return []

    def step(self, run_engine: bool) -> list[dict]:
        if self.prefill:
            results = self.prefill.step(run_engine)
            self.transfers.update(r.state.value for r in results if r.first_token >= 0)
            return [{"op": "error", "rid": r.request_id, "message": r.detail, "retry": False} if r.first_token < 0
                    else {"op": "prefilled", "rid": r.request_id, "state": r.state.value, "detail": r.detail,
                          "nbytes": r.nbytes, "latency_s": r.latency_s}
                    for r in results]
        outputs = self.decode.step(run_engine) if self.decode else (self.engine.step()[1] if run_engine else [])
        return [self._tokens(out) for out in outputs]

    def _tokens(self, out: RequestOutput) -> dict:
        reason = out.finish_reason or ""
        if out.finished and (reason.startswith("error") or not (out.new_token_ids or reason in ("stop", "length"))):
            retry = "KV transfer" in reason  # the KV never came: another decode rank may do better
            return {"op": "error", "rid": out.request_id, "message": reason or "the request failed", "retry": retry}
        return {"op": "tokens", "rid": out.request_id, "ids": out.new_token_ids, "finished": out.finished,
                "reason": out.finish_reason}

    def close(self) -> None:
        if self.prefill:
            self.prefill.sender.close()
        if self.decode:
            self.decode.receiver.close()


class Leader:
    """Rank 0's side: the routers' socket, request -> rank assignment, and event forwarding."""

    FINAL_OPS = ("prefilled", "error")

    def __init__(self, cfg: ServiceConfig, engine: LLMEngine, world_size: int, name: str) -> None:
        self.cfg, self.engine, self.world_size, self.name = cfg, engine, world_size, name
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://{cfg.host}:{cfg.port}")
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.routers: set[bytes] = set()
        self.owner: dict[str, tuple[bytes, int]] = {}
        self.eplb_metrics = None
        """EplbManager.metrics of this rank, added to every status for the routers' /metrics."""
        """rid -> (router identity, rank) while the request lives here."""
        self.loads: list[RankLoad] = []
        self.prefix = PrefixIndex(engine.cache.block_size)
        self._deferred: list[tuple[bytes, dict]] = []
        self._last_beat = 0.0

    def collect(self, wait_ms: float) -> dict[int, list[dict]]:
        """Reads the routers' messages (waiting up to `wait_ms` for the first) -> commands per rank."""
        commands: dict[int, list[dict]] = {}
        new: list[tuple[bytes, dict]] = []
        timeout = int(wait_ms)
        while self.socket.poll(timeout, zmq.POLLIN):
            timeout = 0
            identity, raw = self.socket.recv_multipart()
            try:
                msg = json.loads(raw)
                op = msg["op"]
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed control message")
                continue
            self.routers.add(identity)
            if op == "hello":
                self._send(identity, self.status())
            elif op == "abort":
                entry = self.owner.pop(msg.get("rid"), None)
                if entry is not None:
                    commands.setdefault(entry[1], []).append(msg)
            elif op in ("prefill", "reserve", "generate"):
                new.append((identity, msg))
        new, self._deferred = self._deferred + new, []
        if new and not self.loads:  # before the ranks' first report: assign next iteration
            self._deferred = new
        elif new:
            self._assign(new, commands)
        return commands

    def _assign(self, new: list[tuple[bytes, dict]], commands: dict[int, list[dict]]) -> None:
        if self.cfg.role == "prefill":
            ranks = [PrefillRankLoad(load.rank, load.queued_tokens) for load in self.loads]
            cached = {msg["rid"]: self.prefix.match(msg["prompt"], list(range(self.world_size))) for _, msg in new}
            chosen = assign_prefill([(m["rid"], len(m["prompt"]), cached[m["rid"]]) for _, m in new], ranks)
        else:
            chosen = {}
            ranks = [DecodeRankLoad(load.rank, load.kv_used, load.kv_total, load.running + load.waiting,
                                    load.max_running) for load in self.loads]
            for identity, msg in new:
                need = self.engine.pages_needed(len(msg["prompt"]), msg["max_tokens"])
                if need > max(load.kv_total for load in self.loads):
                    self._send(identity, {"op": "error", "rid": msg["rid"], "retry": False, "status": 400,
                                          "message": f"the request needs {need} KV pages; a {self.cfg.role} rank "
                                                     f"has {max(load.kv_total for load in self.loads)}"})
                    chosen[msg["rid"]] = -1
                    continue
                excluded = set(msg.get("exclude") or [])
                allowed = [r for r, load in zip(ranks, self.loads) if load.address not in excluded] or ranks
                rank = pick_decode_rank(allowed, need)
                if rank is not None:
                    ranks[rank].kv_pages_used += need
                    ranks[rank].running += 1
                    chosen[msg["rid"]] = rank
        for identity, msg in new:
            rank = chosen.get(msg["rid"])
            if rank == -1:  # refused above
                continue
            if rank is None:
                self._send(identity, {"op": "error", "rid": msg["rid"], "retry": True, "status": 503,
                                      "message": f"{self.name}: no rank has free KV pages and a free slot"})
                continue
            if self.cfg.role == "prefill":
                self.prefix.insert(rank, msg["prompt"])
            self.owner[msg["rid"]] = (identity, rank)
            commands.setdefault(rank, []).append(msg)

    def deliver(self, events: list[dict]) -> None:
        for event in events:
            entry = self.owner.get(event["rid"])
            if entry is None:
                continue  # aborted meanwhile: the router no longer listens
            self._send(entry[0], event)
            if event["op"] == "error":
                log.warning("request %s failed on rank %d: %s", event["rid"], entry[1], event["message"])
            if event["op"] in self.FINAL_OPS or (event["op"] == "tokens" and event["finished"]):
                del self.owner[event["rid"]]

    def status(self) -> dict:
        status = {"op": "status", "service": self.name, "role": self.cfg.role,
                  "block_size": self.engine.cache.block_size, "ranks": [asdict(load) for load in self.loads]}
        if self.eplb_metrics is not None:
            status["eplb"] = self.eplb_metrics()
        return status

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self.cfg.heartbeat_s:
            self._last_beat = now
            status = self.status()
            for identity in self.routers:
                self._send(identity, status)

    def _send(self, identity: bytes, msg: dict) -> None:
        self.socket.send_multipart([identity, json.dumps(msg).encode()])

    def close(self) -> None:
        self.socket.close(0)


class ControlPlane:
    """One exchange per iteration over a gloo group (NCCL cannot carry Python objects), in one collective:
    each rank's payload is pickled into a fixed-size byte buffer with its length in front, and the buffers
    are all-gathered. A payload larger than the buffer costs a second round sized for the largest, after
    which every rank grows its buffer the same way (all see the same lengths). all_gather_object takes two
    collectives every time (the sizes, then the data)."""

    def __init__(self, world_size: int, backend: str, capacity: int = 16384) -> None:
        self.world_size = world_size
        self.group = None
        self.capacity = capacity
        """Payload bytes that fit the one-collective exchange; grows to a power of two when exceeded."""
        if world_size > 1:
            self.group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
            self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._send = torch.zeros(_LEN_BYTES + capacity, dtype=torch.uint8)
        self._recv = [torch.empty_like(self._send) for _ in range(self.world_size)]

    def exchange(self, payload: dict) -> list[dict]:
        """Every rank's payload, in rank order, on every rank."""
        if self.world_size == 1:
            return [payload]
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        sizes = self._all_gather(data)
        if max(sizes) > self.capacity:  # the same decision on every rank: all saw the same sizes
            self._resize(1 << (max(sizes) - 1).bit_length())
            self._all_gather(data)
        return [pickle.loads(buf[_LEN_BYTES:_LEN_BYTES + n].numpy().tobytes()) for buf, n in zip(self._recv, sizes)]

    def _all_gather(self, data: bytes) -> list[int]:
        """Sends the length and, when it fits, the payload; returns every rank's length."""
        self._send[:_LEN_BYTES] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        if len(data) <= self.capacity:
            self._send[_LEN_BYTES:_LEN_BYTES + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.all_gather(self._recv, self._send, group=self.group)
        return [int(buf[:_LEN_BYTES].view(torch.int64)) for buf in self._recv]


_LEN_BYTES = 8  # the int64 payload length in front of each exchanged buffer


def serve_rank(cfg: ServiceConfig, engine: LLMEngine, rank: int, world_size: int, backend: str,
               should_stop, eplb_metrics=None) -> None:
    """The loop every rank runs until a rank asks to stop (SIGTERM/SIGINT)."""
    worker = RankWorker(cfg, engine, rank)
    plane = ControlPlane(world_size, backend)
    leader = Leader(cfg, engine, world_size, f"{cfg.role}@{cfg.host}:{cfg.port}") if rank == 0 else None
    if leader is not None:
        leader.eplb_metrics = eplb_metrics
    if leader is not None:
        print(f"moe_pd {cfg.role} instance of {world_size} rank(s) listening at {leader.address}", flush=True)
    events: list[dict] = []
    busy = False
    try:
        while True:
            commands = leader.collect(0 if busy or events else cfg.idle_wait_ms) if leader else None
            load = worker.load()
            payload = {"commands": commands, "events": events, "load": load, "busy": worker.engine_busy,
                       "stop": should_stop()}
            everyone = plane.exchange(payload)
            if leader is not None:
                leader.loads = [p["load"] for p in everyone]
                leader.deliver([e for p in everyone for e in p["events"]])
                leader.heartbeat()
            if any(p["stop"] for p in everyone):
                break
            mine = (everyone[0]["commands"] or {}).get(rank, [])
            events = [e for cmd in mine for e in worker.apply(cmd)]
            # Only exchanged facts decide whether to step, so every rank decides the same.
            busy = any(p["busy"] for p in everyone) or any(everyone[0]["commands"] or {})
            events += worker.step(busy)
    finally:
        worker.close()
        if leader is not None:
            leader.close()


def run(cfg: ServiceConfig, run_dir: str | None = None) -> None:
    model_cfg = resolve_model_config(cfg.model)
    device, dtype = resolve_device(cfg.runtime), resolve_dtype(cfg.runtime)
    state = init_parallel(cfg.parallel, model_cfg, device)
    recorder = FlightRecorder(cfg.parallel.flight_recorder_size)
    watchdog = start_watchdog(cfg.parallel, state, recorder, run_dir)
    stop = {"requested": False}

    def request_stop(*_):
        stop["requested"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        built = build_instance_model(model_cfg, cfg.parallel, cfg.eplb, state, dtype, recorder, cfg.runtime)
        profiler = RankProfiler(cfg.profile, run_dir or ".", cfg.role, state.rank)
        hooks = ([built.eplb.on_step] if built.eplb else []) + [profiler.step]
        sync = StepSync(state, recorder, built.dispatcher, hooks=hooks)
        engine = LLMEngine(built.model, cfg.kvcache, cfg.max_num_seqs, cfg.max_num_batched_tokens, state.device,
                           sync, cfg.overlap, hold_finished_pages=cfg.role == "prefill",
                           decode_graphs=graphs_wanted(cfg.runtime, state, built.model) and cfg.role != "prefill")
        with profiler:
            serve_rank(cfg, engine, state.rank, state.world_size, state.backend, lambda: stop["requested"],
                       built.eplb.metrics if built.eplb else None)
        log.info("%s rank %d stopped after %d engine steps", cfg.role, state.rank, engine.stats.steps)
    finally:
        if watchdog is not None:
            watchdog.stop()
        shutdown(state)


@hydra.main(config_path="pkg://moe_pd.conf", config_name="prefill", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    with exit_on(ConfigError, CheckpointError):
        cfg = to_config(dict_cfg)
        setup_logging(cfg.runtime.log_level)
        run(cfg, HydraConfig.get().runtime.output_dir)


register_configs()

if __name__ == "__main__":
    main()
