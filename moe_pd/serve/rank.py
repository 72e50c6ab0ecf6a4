"""One rank of an instance, by role: it applies its leader's commands, steps its engine, and reports events
and load in protocol messages. A prefill, a decode and a colocated rank are three compositions over the
same engine, not one class with None checks.

A request's own bad content (ids outside the vocabulary, a prompt too long) fails that request with a 400;
no free pages fail it with a 503 the router may retry elsewhere; a KV target this rank cannot send to (another
transfer backend) with a 500; anything else is a bug, logged with its traceback and answered with a 500, and
the rank carries on.
"""

from __future__ import annotations

import logging
import os
import time

from moe_pd.config.serve import ServiceConfig
from moe_pd.engine.core.request import InvalidRequest, State
from moe_pd.engine.disagg import DecodeWorker, PrefillWorker
from moe_pd.engine.llm_engine import LLMEngine, RequestOutput
from moe_pd.kvcache.block_manager import OutOfBlocks
from moe_pd.kvcache.transfer.base import TransferError
from moe_pd.kvcache.transfer.select import make_receiver, make_sender, resolve_backend
from moe_pd.serve import protocol as p

log = logging.getLogger(__name__)


class Rank:
    """What every role shares: the engine, command errors, the load report. Subclasses start requests
    (`_start`), abort them (`_abort`) and step."""

    takes: type = p.Generate

    def __init__(self, engine: LLMEngine, rank: int, max_running: int) -> None:
        self.engine, self.rank, self.max_running = engine, rank, max_running
        engine.report_cache_events = True
        self._figures: p.TierFigures | None = None
        self._figures_at = 0.0

    @property
    def busy(self) -> bool:
        """The engine has requests to run (every rank then steps, so collectives stay paired)."""
        return self.engine.scheduler.has_runnable

    def apply(self, cmd: p.Command) -> list[p.Event]:
        try:
            if isinstance(cmd, p.Abort):
                self._abort(cmd)
                return []
            if not isinstance(cmd, self.takes):
                raise InvalidRequest(f"rank {self.rank} does not take '{type(cmd).__name__.lower()}' requests")
            return self._start(cmd)
        except OutOfBlocks as exc:
            log.info("rank %d: no KV pages for %s now (%s)", self.rank, cmd.rid, exc)
            return [p.Error(cmd.rid, "no free KV cache pages", retry=True, status=503)]
        except InvalidRequest as exc:
            return [p.Error(cmd.rid, str(exc), retry=False, status=400)]
        except TransferError as exc:  # a KV target this rank cannot send to: its configuration, not a bug
            log.error("rank %d: %s: %s", self.rank, cmd.rid, exc)
            return [p.Error(cmd.rid, str(exc), retry=False, status=500)]
        except Exception:  # a bug: fail this request, keep the rank (and its peers) running
            log.exception("rank %d: %s of %s failed", self.rank, type(cmd).__name__, cmd.rid)
            return [p.Error(cmd.rid, "internal error", status=500)]

    def _start(self, cmd: p.Command) -> list[p.Event]:
        raise NotImplementedError

    def _abort(self, cmd: p.Abort) -> None:
        self.engine.abort(cmd.rid)

    def step(self, run_engine: bool) -> list[p.Event]:
        return [tokens_event(out) for out in (self.engine.step()[1] if run_engine else [])]

    def load(self) -> p.RankLoad:
        """Everything counted from the engine's request table (engine.requests)."""
        requests, allocator = self.engine.requests, self.engine.allocator
        queued = sum(r.num_uncomputed for r in (*requests.waiting, *requests.running) if r.is_prefill)
        spec = self.engine.stats.spec
        in_transfer = requests.count(State.RESERVED, State.FENCED, State.TRANSFERRING)
        return p.RankLoad(self.rank, allocator.num_used, allocator.num_blocks,
                          len(requests.running) + requests.count(State.RESERVED), len(requests.waiting), queued,
                          self.max_running, self.address, in_transfer, requests.cached_tokens, requests.aborted,
                          os.getpid(), reserved=requests.count(State.RESERVED), transfers=dict(requests.transfers),
                          kv_backend=self.kv_backend, spec_verifications=spec.verifications if spec else 0,
                          spec_accepted_at=list(spec.accepted_at) if spec else [], tiers=self._tier_figures())

    def _tier_figures(self, every_s: float = 1.0) -> p.TierFigures:
        """The KV cache's figures, recounted at most every `every_s` (the tiers' usage takes locks)."""
        now = time.monotonic()
        if self._figures is None or now - self._figures_at >= every_s:
            self._figures, self._figures_at = tier_figures(self.engine), now
        return self._figures

    def cache_events(self) -> list[p.CacheEvents]:
        """What this rank's device cache and its writes into the node's tiers stored and removed since the
        last report."""
        stored, removed = self.engine.take_cache_events()
        events = [p.CacheEvents("device", stored, removed)] if stored or removed else []
        if self.engine.tiers is not None:
            events += [p.CacheEvents(tier, s, r) for tier, (s, r) in self.engine.tiers.take_events().items()
                       if s or r]
        return events

    address = ""
    kv_backend = ""

    def close(self) -> None:
        pass


def tier_figures(engine: LLMEngine) -> p.TierFigures:
    hits = {k: int(v) for k, v in engine.requests.cached_by_source.items()}
    usage = engine.tier_usage()
    if not usage:
        return p.TierFigures(hit_tokens=hits)
    tiers = usage.pop("usage")
    return p.TierFigures(hits, usage["promoted_pages"], usage["promotions"], usage["promotion_misses"],
                         usage["load_seconds"], {"dram": usage["dram_writes"], "disk": usage["disk_writes"]},
                         usage["corrupt"], {t: u["bytes"] for t, u in tiers.items()},
                         {t: u["entries"] for t, u in tiers.items()})


def tokens_event(out: RequestOutput) -> p.Event:
    reason = out.finish_reason or ""
    if out.finished and (reason.startswith("error") or not (out.new_token_ids or reason in ("stop", "length"))):
        retry = "KV transfer" in reason  # the KV never came: another decode rank may do better
        return p.Error(out.request_id, reason or "the request failed", retry=retry,
                       status=503 if retry else 500 if reason.startswith("error") else 400)
    return p.Tokens(out.request_id, out.new_token_ids, out.finished, out.finish_reason, out.logprobs,
                    out.prompt_logprobs, out.cached_tokens)


class ColocatedRank(Rank):
    takes = p.Generate

    def _start(self, cmd: p.Generate) -> list[p.Event]:
        self.engine.add_request(cmd.rid, cmd.prompt, cmd.max_tokens, cmd.params, cmd.seed, cmd.ignore_eos)
        return []


class PrefillRank(Rank):
    """Runs prompts and ships their KV to the decode rank each names."""

    takes = p.Prefill

    def __init__(self, engine: LLMEngine, rank: int, max_running: int, worker: PrefillWorker) -> None:
        super().__init__(engine, rank, max_running)
        self.worker = worker

    @property
    def kv_backend(self) -> str:
        return self.worker.sender.backend

    def _start(self, cmd: p.Prefill) -> list[p.Event]:
        self.worker.submit(cmd.rid, cmd.prompt, cmd.kv, cmd.params, cmd.seed)
        return []

    def _abort(self, cmd: p.Abort) -> None:
        self.worker.cancel(cmd.rid)

    def step(self, run_engine: bool) -> list[p.Event]:
        return [p.Error(r.request_id, r.error, status=500) if r.error else
                p.Prefilled(r.request_id, r.state.value, r.detail, r.nbytes, r.latency_s, r.logprobs, r.prompt_logprobs,
                            backend=self.kv_backend)
                for r in self.worker.step(run_engine)]

    def close(self) -> None:
        self.worker.sender.close()


class DecodeRank(Rank):
    """Reserves pages for prompts prefilled elsewhere, takes their KV, and decodes."""

    takes = p.Reserve

    def __init__(self, engine: LLMEngine, rank: int, max_running: int, worker: DecodeWorker) -> None:
        super().__init__(engine, rank, max_running)
        self.worker = worker

    @property
    def address(self) -> str:
        return self.worker.address

    @property
    def kv_backend(self) -> str:
        return self.worker.receiver.backend

    def _start(self, cmd: p.Reserve) -> list[p.Event]:
        req = self.worker.reserve(cmd.rid, cmd.prompt, cmd.max_tokens, cmd.params, cmd.seed, cmd.ignore_eos)
        return [p.Reserved(cmd.rid, self.worker.target(req), self.rank)]

    def _abort(self, cmd: p.Abort) -> None:
        self.worker.abort(cmd.rid, cmd.writer)

    def step(self, run_engine: bool) -> list[p.Event]:
        return [tokens_event(out) for out in self.worker.step(run_engine)]

    def close(self) -> None:
        self.worker.receiver.close()


def make_rank(cfg: ServiceConfig, engine: LLMEngine, rank: int) -> Rank:
    """The rank's role, with its end of the KV transfer backend (created once, here)."""
    if cfg.role == "colocated":
        return ColocatedRank(engine, rank, cfg.max_num_seqs)
    kv = engine.cache.kv_LPSW
    backend = resolve_backend(cfg.kvcache.transfer, kv.device.type)
    name = f"{cfg.role}-{rank}"
    if cfg.role == "prefill":
        drop = cfg.testing.drop_kv_transfers if rank == 0 else 0
        sender = make_sender(backend, cfg.kvcache, kv, name, cfg.kv_host, cfg.kv_timeout_s)
        return PrefillRank(engine, rank, cfg.max_num_seqs, PrefillWorker(engine, sender, cfg.kv_timeout_s, drop))
    receiver = make_receiver(backend, cfg.kvcache, kv, name, cfg.kv_host, cfg.advertise_host, cfg.kv_timeout_s)
    return DecodeRank(engine, rank, cfg.max_num_seqs, DecodeWorker(engine, receiver, cfg.kv_timeout_s))
