"""One model instance serving requests step by step: add, step, abort. The offline generator and the
serving workers both drive this.

Every step the core scheduler plans decodes and prefill chunks; the runner executes the plan as one
forward over the paged latent cache (two interleaved micro-batches when overlap is on) and samples where a
chunk reached its sequence's end, each request with its own sampling parameters and generator. Under
expert parallelism every rank runs its own engine on its own requests and the ranks step together
(`StepSync`): an idle rank runs empty forwards so every MoE all-to-all stays paired. With
`num_draft_tokens` = K > 0 the checkpoint's MTP layer drafts K tokens per decoding request and a step
verifies them (moe_pd.engine.spec.engine_step): greedy output is unchanged, sampling keeps its distribution.

Below the device pages sit the KV tiers of the node (kvcache.host_tier_*, disk_tier_*; see
docs/kv_tiers.md): the scheduler promotes prefixes found there, and the engine offers pages down, as they
fill (write_through) or as the device evicts them (write_back, before the step that reuses them writes).
Every full page is named by its chained tier key, so what the device cache stored and evicted can be
reported to the routers (`cache_events`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.overlap import OverlapConfig
from moe_pd.engine.core.request import Logprob, Request, SamplingParams, State
from moe_pd.engine.core.scheduler import Scheduler, StepPlan
from moe_pd.engine.cuda_graph import DecodeGraphRunner
from moe_pd.engine.sampler import logprobs, sample
from moe_pd.engine.spec.engine_step import SpecStats, SpeculativeStep
from moe_pd.engine.spec.mtp_step import MTPSpeculator
from moe_pd.kvcache.block_manager import BlockManager
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.kvcache.tiers.build import build_tiers, model_identity
from moe_pd.kvcache.transfer.base import KVTarget, Transfer
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.overlap.micro_batch import split_step
from moe_pd.overlap.schedule import DECODE, PREFILL, forward_two_micro_batches
from moe_pd.parallel.step_sync import StepSync


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    rng_state: torch.Tensor | None = None
    """A finished sampled request's generator state (a prefill instance hands it to decode, so sampled
    tokens match the colocated engine's)."""
    listener: Any = None
    """The request's listener (Request.listener)."""
    logprobs: list[Logprob] | None = None
    """The new tokens' log-probabilities, when the request asked for them."""
    prompt_logprobs: list[Logprob | None] | None = None
    """With the request's first token: its prompt's log-probabilities, when it asked for them."""
    cached_tokens: int | None = None
    """With the request's first token: its prompt tokens served from a cache (device pages or a tier)."""


def output(req: Request, tokens: list[int]) -> RequestOutput:
    state = req.generator.get_state() if req.generator is not None and req.finished else None
    lp = None
    if req.logprobs is not None and tokens:  # aligned to output_ids' tail (decode lacks prefill's first token's)
        offset = len(req.output_ids) - len(req.logprobs)
        lp = req.logprobs[max(0, len(req.output_ids) - len(tokens) - offset):]
    first = len(req.output_ids) == len(tokens) and bool(tokens)
    return RequestOutput(req.request_id, tokens, req.finished, req.finish_reason, state, req.listener, lp,
                         req.prompt_logprobs if first else None, req.num_cached_hit if first else None)


@dataclass
class StepStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    spec: SpecStats | None = None
    """Speculative decoding's acceptance (None when it is off)."""


class LLMEngine:
    def __init__(self, model: DeepseekForCausalLM, kv: KVCacheConfig, max_num_seqs: int,
                 max_num_batched_tokens: int, device: torch.device | str = "cpu", sync: StepSync | None = None,
                 overlap: OverlapConfig | None = None, hold_finished_pages: bool = False,
                 decode_graphs: bool = False, num_draft_tokens: int = 0) -> None:
        """`hold_finished_pages`: a request that finished generating keeps its pages (PREFILLED) until it is
        shipped (a prefill instance). `decode_graphs`: decode steps run through a DecodeGraphRunner (CUDA
        graphs on CUDA, the same static-buffer forward eagerly elsewhere), and with num_draft_tokens the
        verification steps too (a second runner at K + 1 queries per sequence; the MTP layer's forwards run
        eagerly); one process only, with the Triton ops. `num_draft_tokens`: K of speculative decoding with
        the model's MTP layer (built with build_model(mtp=True)); 0 is off."""
        cfg = model.cfg
        self.model, self.device, self.sync, self.overlap = model, torch.device(device), sync, overlap
        self.max_context, self.eos = cfg.max_position_embeddings, cfg.eos_token_id
        dtype = model.model.embed_tokens.weight.dtype  # activations (FP8 expert weights are not)
        if decode_graphs and sync is not None and sync.state.world_size > 1:
            raise ValueError("decode graphs run one process (EP = 1); this engine has an EP group")
        # With graphs, one page past the allocator's is the scratch page that padding slots write to.
        if num_draft_tokens and not len(model.mtp):
            raise ValueError("speculative decoding needs the model's MTP layer: build_model(mtp=True)")
        self.cache = PagedLatentCache(model.num_cache_layers, kv.num_blocks + decode_graphs, kv.block_size,
                                      cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=dtype, device=self.device)
        self.identity = model_identity(cfg, self.cache)
        self.allocator = BlockManager(kv.num_blocks, kv.block_size, kv.prefix_cache, self.identity.digest)
        self.tiers = build_tiers(kv, self.identity, self.cache)
        self.write_back = kv.tier_write_policy == "write_back"
        self.report_cache_events = False
        """Keep the device cache's stored / evicted keys for `take_cache_events` (the serving ranks do)."""
        self._stored: list[bytes] = []
        self._removed: list[bytes] = []
        self.graphs = self.verify_graphs = None
        if decode_graphs:
            max_pages = self.allocator.blocks_for(self.max_context + 2 * num_draft_tokens)
            self.graphs = DecodeGraphRunner(model, self.cache, max_num_seqs, max_pages, scratch_page=kv.num_blocks)
            if num_draft_tokens:  # verification steps at the static K, beside the decode steps of plain requests
                self.verify_graphs = DecodeGraphRunner(model, self.cache, max_num_seqs, max_pages,
                                                       scratch_page=kv.num_blocks, queries=num_draft_tokens + 1)
            if self.device.type == "cuda":
                self.graphs.capture()
                if self.verify_graphs is not None:
                    self.verify_graphs.capture()
        self.scheduler = Scheduler(self.allocator, max_num_seqs, max_num_batched_tokens, self.max_context,
                                   hold_finished_pages, cfg.vocab_size, self.tiers, num_draft_tokens)
        self.scheduler.write_back = self.write_back
        self.requests = self.scheduler.requests
        """Every request of this engine: its state and what it holds (moe_pd.engine.core.table)."""
        self.stats = StepStats()
        self._global = (0, 0)
        self.speculative = None
        if num_draft_tokens:
            speculator = MTPSpeculator(model, self.cache, num_draft_tokens, self.device, self._forward)
            multi_rank = sync is not None and sync.state.world_size > 1
            self.speculative = SpeculativeStep(speculator, self._run_plain, always_run=multi_rank)
            self.stats.spec = self.speculative.stats

    # requests ---------------------------------------------------------------------------------------------
    def _record(self, request_id: str, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                seed: int | None, ignore_eos: bool, **extra) -> Request:
        generator = None if params.greedy else torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(2**62, ()).item()))
        return Request(list(prompt_ids), max_new_tokens, request_id, self.eos, ignore_eos, params, seed,
                       generator=generator, **extra)

    def add_request(self, request_id: str, prompt_ids: list[int], max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), seed: int | None = None, ignore_eos: bool = False,
                    destination: KVTarget | None = None, listener: Any = None) -> Request:
        """Queues a request; raises InvalidRequest for one that can never run (its prompt, or a size no cache
        of this engine holds). `destination`: a prefill instance's decode-rank reservation for its KV."""
        req = self._record(request_id, prompt_ids, max_new_tokens, params, seed, ignore_eos,
                           destination=destination, listener=listener)
        return self.scheduler.add(req)

    def reserve(self, request_id: str, prompt_ids: list[int], max_new_tokens: int, timeout_s: float,
                params: SamplingParams = SamplingParams(), seed: int | None = None,
                ignore_eos: bool = False) -> Request:
        """Decode side of disaggregation: pages for a prompt prefilled elsewhere, RESERVED until its KV
        arrives (`activate`) or `timeout_s` passes. Raises OutOfBlocks when they do not fit now."""
        req = self._record(request_id, prompt_ids, max_new_tokens, params, seed, ignore_eos)
        self.scheduler.reserve(req, Transfer(time.monotonic() + timeout_s))
        return req

    def activate(self, req: Request, first_token: int, rng_state: torch.Tensor | None = None,
                 drafts: list[int] = ()) -> RequestOutput:
        """Its prompt's latents arrived: decode from prefill's first token (or finish now if that token ends
        it). `rng_state` continues prefill's sampling generator; `drafts` (prefill's greedy MTP drafts) are
        verified in the first step when they are K of them."""
        if rng_state is not None and req.generator is not None:
            req.generator.set_state(rng_state)
        if self.speculative is not None and len(drafts) == self.speculative.spec.num_drafts and req.params.greedy:
            req.drafts = list(drafts)
        self.scheduler.activate(req, first_token)
        return output(req, [first_token])

    def fail(self, req: Request, reason: str) -> RequestOutput:
        self.requests.transition(req, State.FAILED, reason)
        return output(req, [])

    def abort(self, request_id: str) -> bool:
        """Ends the request and frees what it holds; False when it is unknown or already ended."""
        return self.scheduler.abort(request_id) is not None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # steps ------------------------------------------------------------------------------------------------
    def step(self) -> tuple[bool, list[RequestOutput]]:
        """Runs one step (an empty one when only other ranks have work). Returns (any rank had work,
        outputs of this rank's requests that got a token or ended)."""
        plan = self.scheduler.schedule()
        self._offer(self.allocator.take_evicted() if self.write_back else ())  # before this step overwrites them
        outputs: list[RequestOutput] = []
        # a verification counts its drafts as tokens (the padded all-to-all must hold them) but as one query,
        # so a step of decodes and verifications overlaps with the decode schedule
        longest = max((s.num_new for s in plan.scheduled), default=0)
        if not self._sync_step(not plan.is_empty, plan.num_positions, longest):
            return False, outputs
        t0 = time.perf_counter()
        prefill = any(s.num_new > 1 or not s.samples for s in plan.scheduled)  # (before the update moves them)
        sampled, failed = self._run(plan)
        before = {item.seq.request_id: len(item.seq.output_ids) for item in plan.scheduled}
        # a request whose logits failed it ends alone; the step and every other request go on
        self.scheduler.update(plan, sampled, {r.request_id: "no token could be sampled (non-finite logits)"
                                              for r in failed})
        outputs += [output(req, []) for req in failed]
        self._offer(self.allocator.take_new_pages() if not self.write_back else ())
        emitted = 0
        for item in plan.scheduled:
            if item.seq.request_id in sampled:  # the tokens it kept (a verification stops at a stop token)
                tokens = item.seq.output_ids[before[item.seq.request_id]:]
                emitted += len(tokens)
                outputs.append(output(item.seq, tokens))
        self._account(plan, prefill, time.perf_counter() - t0, emitted)
        return True, outputs

    # KV tiers ---------------------------------------------------------------------------------------------
    def _offer(self, pages) -> None:
        """Offers `pages` to the tiers; drops what the other policy's list gathered, and the cache events
        nobody reads."""
        self.allocator.take_new_pages() if self.write_back else self.allocator.take_evicted()
        if self.tiers is not None and pages:
            self.tiers.offer(pages)
        stored, removed = self.allocator.take_events()
        if self.report_cache_events:
            self._stored += stored
            self._removed += removed

    def take_cache_events(self) -> tuple[list[bytes], list[bytes]]:
        """(keys the device cache stored, keys it evicted) since the last call (report_cache_events)."""
        out = self._stored, self._removed
        self._stored, self._removed = [], []
        return out

    def tier_usage(self) -> dict:
        """Per-process tier counters and the tiers' bytes and entries (empty without tiers)."""
        if self.tiers is None:
            return {}
        disk = self.tiers.disk
        return {**self.tiers.stats.snapshot(), "corrupt": disk.counters.corrupt if disk else 0,
                "usage": self.tiers.usage()}

    def close(self) -> None:
        """Stops the tier thread (its queued writes done) and unmaps the DRAM pool."""
        if self.tiers is not None:
            self.tiers.close()
            self.tiers = self.scheduler.tiers = None

    def _account(self, plan: StepPlan, prefill: bool, elapsed: float, emitted: int) -> None:
        """A step with any prefill chunk counts as prefill (its tokens computed); a decode step counts the
        tokens it emitted (more than one per request when drafts were accepted)."""
        self.stats.steps += 1
        if prefill:
            self.stats.prefill_tokens += plan.num_tokens
            self.stats.prefill_s += elapsed
            self.scheduler.cost.observe_prefill(plan.num_tokens, elapsed)
        elif plan.scheduled:
            self.stats.decode_tokens += emitted
            self.stats.decode_s += elapsed

    def _sync_step(self, local_busy: bool, num_tokens: int, max_query_len: int) -> bool:
        if self.sync is None:
            self._global = (num_tokens, max_query_len)
            return local_busy
        busy = self.sync.step(local_busy, num_tokens, max_query_len)
        self._global = (self.sync.max_tokens, self.sync.max_query_len)
        return busy

    def _forward(self, ids_T: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Two interleaved micro-batches when overlap is on and some rank has enough tokens; every rank
        makes the same choice from the step's all-reduced maxima."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(ids_T, batch)
        if self.verify_graphs is not None and self.verify_graphs.can_run(batch):
            return self.verify_graphs.run(ids_T, batch)
        max_tokens, max_query_len = self._global
        if self.overlap is None or not self.overlap.enabled or max_tokens < self.overlap.min_tokens:
            return self.model(ids_T, batch, self.cache)
        schedule = DECODE if max_query_len <= 1 else PREFILL
        return forward_two_micro_batches(self.model, split_step(ids_T, batch), self.cache, schedule)

    def _run(self, plan: StepPlan) -> tuple[dict[str, list[int]], list[Request]]:
        """The step's forwards and sampling: (request id -> its new tokens, requests no token could be sampled
        for)."""
        if self.speculative is not None:
            return self.speculative.run(plan.scheduled)
        _, _, sampled, failed = self._run_plain(plan.scheduled)
        return {rid: [t] for rid, t in sampled.items()}, failed

    def _run_plain(self, items: list) -> tuple[torch.Tensor, AttentionBatch, dict[str, int], list[Request]]:
        """One forward over the items' tokens, sampling where a chunk reached its sequence's end: (hidden
        states, the batch, request id -> sampled token, requests no token could be sampled for)."""
        batch = AttentionBatch.build([s.seq.block_table for s in items], [s.context for s in items],
                                     [s.num_new for s in items], self.cache.block_size, self.device)
        ids = [t for s in items for t in s.seq.token_slice(s.context, s.context + s.num_new)]
        ids_T = torch.tensor(ids, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden_TD = self._forward(ids_T, batch)
            self._prompt_logprobs(items, batch, hidden_TD)
            rows = [i for i, s in enumerate(items) if s.samples]
            if not rows:
                return hidden_TD, batch, {}, []
            last_B = (batch.query_starts_B + batch.query_lens_B - 1)[rows]
            logits_BV = self.model.logits(hidden_TD[last_B])
        reqs = [items[i].seq for i in rows]
        tokens = sample(logits_BV, [r.params for r in reqs], [r.generator for r in reqs], [r.output_ids for r in reqs])
        wanted = [b for b, (r, t) in enumerate(zip(reqs, tokens)) if r.logprobs is not None and t is not None]
        if wanted:
            for b, lp in zip(wanted, logprobs(logits_BV[wanted], [tokens[b] for b in wanted],
                                              [reqs[b].params.logprobs for b in wanted])):
                reqs[b].logprobs.append(lp)
        return (hidden_TD, batch, {r.request_id: t for r, t in zip(reqs, tokens) if t is not None},
                [r for r, t in zip(reqs, tokens) if t is None])

    def _prompt_logprobs(self, items, batch: AttentionBatch, hidden_TD: torch.Tensor) -> None:
        """Appends, for requests that asked, the log-probability of each prompt token this chunk's positions
        predict (position p predicts token p + 1)."""
        for b, item in enumerate(items):
            req = item.seq
            if req.prompt_logprobs is None:
                continue
            start = len(req.prompt_logprobs) - 1  # the first position still to predict (recomputes skip)
            end = min(item.context + item.num_new, len(req.prompt_ids) - 1)
            if start < item.context or start >= end:
                continue
            first_row = int(batch.query_starts_B[b]) + start - item.context
            logits_PV = self.model.logits(hidden_TD[first_row : first_row + end - start])
            targets = req.prompt_ids[start + 1 : end + 1]
            req.prompt_logprobs += logprobs(logits_PV, targets, [req.params.prompt_logprobs] * len(targets))
