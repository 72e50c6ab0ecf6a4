"""Offline generation on one model instance: the engine core's scheduler driving the model.

Each step the scheduler (engine/core/scheduler.py) picks decodes and prefill chunks within a token budget,
with prefix-cache hits skipping computation and preemption (recompute) when pages run out; this runner
turns the plan into one forward over the paged latent cache and samples where a chunk reached its
sequence's end.

Under expert parallelism every rank runs one engine on its own prompts (data-parallel attention) and the
ranks step together through `StepSync`: a rank with nothing left runs empty forwards, which still take
part in every MoE layer's all-to-all, until no rank has work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.overlap import OverlapConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.core.scheduler import Scheduler, StepPlan
from moe_pd.engine.core.sequence import Sequence
from moe_pd.engine.sampler import SamplingParams, sample
from moe_pd.kvcache.block_manager import BlockManager
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.overlap.micro_batch import split_step
from moe_pd.overlap.schedule import DECODE, PREFILL, forward_two_micro_batches
from moe_pd.parallel.step_sync import StepSync

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """A prompt the model cannot take (empty, too long, ids out of the vocabulary)."""


@dataclass
class Completion:
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    ttft_s: float
    """Time from the start of the run to this request's first token."""
    decode_s: float
    """Time from the first to the last token."""
    cached_tokens: int = 0
    """Prompt tokens served by the prefix cache."""
    preemptions: int = 0


@dataclass
class RunStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0


def check_prompts(prompts: list[list[int]], vocab_size: int, max_context: int) -> None:
    for i, ids in enumerate(prompts):
        if not ids:
            raise PromptError(f"prompt {i} is empty")
        if len(ids) >= max_context:
            raise PromptError(f"prompt {i} has {len(ids)} tokens; the model's context is {max_context} "
                              f"(model.max_position_embeddings), leaving no room to generate")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


class OfflineEngine:
    def __init__(self, model: DeepseekForCausalLM, kv: KVCacheConfig, max_batch_size: int,
                 device: torch.device | str = "cpu", sync: StepSync | None = None,
                 overlap: OverlapConfig | None = None, max_num_batched_tokens: int = 4096) -> None:
        cfg = model.cfg
        self.model, self.device, self.max_batch_size = model, torch.device(device), max_batch_size
        self.sync, self.overlap, self.kv = sync, overlap, kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_context = cfg.max_position_embeddings
        self.eos = cfg.eos_token_id
        dtype = next(model.parameters()).dtype
        self.cache = PagedLatentCache(cfg.num_hidden_layers, kv.num_blocks, kv.block_size, cfg.kv_lora_rank,
                                      cfg.qk_rope_head_dim, dtype=dtype, device=self.device)
        self.allocator = BlockManager(kv.num_blocks, kv.block_size, kv.prefix_cache)
        self.stats = RunStats()
        self._global = (0, 0)  # (max tokens, max new tokens of one sequence) of any rank this step

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 indices: list[int] | None = None) -> list[Completion]:
        """Completions in prompt order. `indices` are the prompts' positions in the whole job (they seed
        the per-prompt generators and label the results); default 0..n-1."""
        check_prompts(prompts, self.model.cfg.vocab_size, self.max_context)
        indices = list(range(len(prompts))) if indices is None else indices
        params = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p)
        base_seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        scheduler = Scheduler(self.allocator, self.max_batch_size, self.max_num_batched_tokens, self.max_context)
        seqs = [Sequence(list(p), sampling.max_new_tokens, request_id=str(i), eos_token_id=self.eos,
                         ignore_eos=sampling.ignore_eos) for i, p in zip(indices, prompts, strict=True)]
        generators = {s.request_id: None if params.greedy else torch.Generator().manual_seed(base_seed + int(i))
                      for s, i in zip(seqs, indices)}
        for seq in seqs:
            need = self.allocator.blocks_for(len(seq.prompt_ids) + min(seq.max_new_tokens,
                                                                       self.max_context - len(seq.prompt_ids)))
            if need > self.allocator.num_blocks:
                raise PromptError(f"prompt {seq.request_id} needs {need} pages of the cache but kvcache.num_blocks="
                                  f"{self.allocator.num_blocks}; raise kvcache.num_blocks")
            scheduler.add(seq)
        started = time.perf_counter()
        first_token: dict[str, float] = {}
        last_token: dict[str, float] = {}
        while True:
            plan = scheduler.schedule()
            longest = max((s.num_new for s in plan.scheduled), default=0)
            if not self._sync_step(not plan.is_empty, plan.num_tokens, longest):
                break
            t0 = time.perf_counter()
            sampled = self._run(plan, params, generators)
            elapsed, now = time.perf_counter() - t0, time.perf_counter()
            for rid in sampled:
                first_token.setdefault(rid, now)
                last_token[rid] = now
            self._account(plan, elapsed)
            scheduler.update(plan, sampled)
        return [
            Completion(int(s.request_id), s.prompt_ids, s.output_ids, s.finish_reason or "length",
                       first_token.get(s.request_id, started) - started,
                       last_token.get(s.request_id, started) - first_token.get(s.request_id, started),
                       s.num_cached_hit, s.num_preemptions)
            for s in sorted(scheduler.finished, key=lambda s: int(s.request_id))
        ]

    def _account(self, plan: StepPlan, elapsed: float) -> None:
        self.stats.steps += 1
        if any(s.num_new > 1 or not s.samples for s in plan.scheduled):
            self.stats.prefill_tokens += plan.num_tokens
            self.stats.prefill_s += elapsed
        elif plan.scheduled:
            self.stats.decode_tokens += plan.num_tokens
            self.stats.decode_s += elapsed

    def _sync_step(self, local_busy: bool, num_tokens: int, max_query_len: int) -> bool:
        """Whether any rank has work this step (every rank then runs one forward)."""
        if self.sync is None:
            self._global = (num_tokens, max_query_len)
            return local_busy
        busy = self.sync.step(local_busy, num_tokens, max_query_len)
        self._global = (self.sync.max_tokens, self.sync.max_query_len)
        return busy

    def _forward(self, ids_T: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """One step's forward, split into two interleaved micro-batches when overlap is on and some rank
        has enough tokens; every rank makes the same choice from the step's all-reduced maxima."""
        max_tokens, max_query_len = self._global
        if self.overlap is None or not self.overlap.enabled or max_tokens < self.overlap.min_tokens:
            return self.model(ids_T, batch, self.cache)
        schedule = DECODE if max_query_len <= 1 else PREFILL
        return forward_two_micro_batches(self.model, split_step(ids_T, batch), self.cache, schedule)

    def _run(self, plan: StepPlan, params: SamplingParams, generators: dict) -> dict[str, int]:
        """The plan's forward (an empty one on an idle rank) and the sampled tokens by request id."""
        items = plan.scheduled
        batch = AttentionBatch.build([s.seq.block_table for s in items], [s.context for s in items],
                                     [s.num_new for s in items], self.cache.block_size, self.device)
        ids = [t for s in items for t in s.seq.token_ids[s.context : s.context + s.num_new]]
        ids_T = torch.tensor(ids, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden_TD = self._forward(ids_T, batch)
            rows = [i for i, s in enumerate(items) if s.samples]
            if not rows:
                return {}
            last_B = (batch.query_starts_B + batch.query_lens_B - 1)[rows]
            logits_BV = self.model.logits(hidden_TD[last_B])
        chosen = [items[i].seq for i in rows]
        tokens = sample(logits_BV, [params] * len(chosen), [generators[s.request_id] for s in chosen])
        return {seq.request_id: tok for seq, tok in zip(chosen, tokens)}
