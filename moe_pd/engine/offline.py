"""Offline generation on one model instance: continuous batching over the paged latent cache.

Each step either prefills newly admitted prompts (all their tokens in one forward) or decodes one token
for every running sequence. A prompt is admitted when a batch slot is free and the pool can hold its
whole worst case (prompt + max_new_tokens), so a running sequence never runs out of pages.

Under expert parallelism every rank runs one engine on its own prompts (data-parallel attention) and the
ranks step together through `StepSync`: a rank with nothing left runs empty forwards, which still take
part in every MoE layer's all-to-all, until no rank has work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.overlap import OverlapConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.sampler import SamplingParams, sample
from moe_pd.kvcache.block_manager import BlockAllocator
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.overlap.micro_batch import split_step
from moe_pd.overlap.schedule import DECODE, PREFILL, forward_two_micro_batches
from moe_pd.parallel.step_sync import StepSync

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """A prompt the model cannot take (empty, too long, ids out of the vocabulary)."""


@dataclass
class Sequence:
    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


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


@dataclass
class RunStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0


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
                 overlap: OverlapConfig | None = None) -> None:
        cfg = model.cfg
        self.model, self.device, self.max_batch_size = model, torch.device(device), max_batch_size
        self.sync, self.overlap = sync, overlap
        self._global = (0, 0)  # (max tokens, max new tokens of one sequence) of any rank this step
        self.max_context = cfg.max_position_embeddings
        self.eos = cfg.eos_token_id
        dtype = next(model.parameters()).dtype
        self.cache = PagedLatentCache(cfg.num_hidden_layers, kv.num_blocks, kv.block_size, cfg.kv_lora_rank,
                                      cfg.qk_rope_head_dim, dtype=dtype, device=self.device)
        self.blocks = BlockAllocator(kv.num_blocks, kv.block_size)
        self.stats = RunStats()
        self.ignore_eos = False
        self._reserved = 0  # pages promised to admitted sequences (their worst case)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 indices: list[int] | None = None) -> list[Completion]:
        """Completions in prompt order. `indices` are the prompts' positions in the whole job (they seed
        the per-prompt generators and label the results); default 0..n-1."""
        check_prompts(prompts, self.model.cfg.vocab_size, self.max_context)
        indices = list(range(len(prompts))) if indices is None else indices
        params = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p)
        base_seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        waiting = [
            Sequence(i, list(p), min(sampling.max_new_tokens, self.max_context - len(p)), params,
                     None if params.greedy else torch.Generator().manual_seed(base_seed + i))
            for i, p in zip(indices, prompts, strict=True)
        ]
        for seq in waiting:
            need = self.blocks.blocks_for(seq.num_tokens + seq.max_new_tokens)
            if need > self.blocks.num_blocks:
                raise PromptError(f"prompt {seq.index} needs {need} pages of the cache but kvcache.num_blocks="
                                  f"{self.blocks.num_blocks}; raise kvcache.num_blocks")
        self.ignore_eos = sampling.ignore_eos
        started, running, done = time.perf_counter(), [], []
        while True:
            admitted = self._admit(waiting, running)
            step_tokens = sum(len(s.prompt_ids) for s in admitted) if admitted else len(running)
            longest = max((len(s.prompt_ids) for s in admitted), default=1 if running else 0)
            if not self._sync_step(bool(admitted or running), step_tokens, longest):
                break
            if admitted:
                self._prefill(admitted)
                running.extend(admitted)
            elif running:
                self._decode(running)
            else:
                self._step([], [])  # idle rank: an empty forward keeps the MoE collectives in step
            for seq in [s for s in running if s.finish_reason]:
                running.remove(seq)
                self._reserved -= self.blocks.blocks_for(len(seq.prompt_ids) + seq.max_new_tokens)
                self.blocks.free(seq.block_table)
                done.append(seq)
        return [
            Completion(s.index, s.prompt_ids, s.output_ids, s.finish_reason or "length",
                       s.first_token_at - started, s.finished_at - s.first_token_at)
            for s in sorted(done, key=lambda s: s.index)
        ]

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

    def _admit(self, waiting: list[Sequence], running: list[Sequence]) -> list[Sequence]:
        admitted = []
        while waiting and len(running) + len(admitted) < self.max_batch_size:
            need = self.blocks.blocks_for(len(waiting[0].prompt_ids) + waiting[0].max_new_tokens)
            if self._reserved + need > self.blocks.num_blocks:
                break
            self._reserved += need
            admitted.append(waiting.pop(0))
        return admitted

    def _step(self, seqs: list[Sequence], new_tokens: list[list[int]]) -> list[int]:
        ctx = [seq.num_tokens - len(new) for seq, new in zip(seqs, new_tokens)]
        for seq, c, new in zip(seqs, ctx, new_tokens):
            self.blocks.grow(seq.block_table, c + len(new))
        batch = AttentionBatch.build([s.block_table for s in seqs], ctx, [len(n) for n in new_tokens],
                                     self.cache.block_size, self.device)
        ids_T = torch.tensor([t for n in new_tokens for t in n], dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden_TD = self._forward(ids_T, batch)
            if not seqs:
                return []
            last_B = batch.query_starts_B + batch.query_lens_B - 1
            logits_BV = self.model.logits(hidden_TD[last_B])
        return sample(logits_BV, [s.params for s in seqs], [s.generator for s in seqs])

    def _append(self, seqs: list[Sequence], tokens: list[int]) -> None:
        now = time.perf_counter()
        for seq, tok in zip(seqs, tokens):
            if not seq.output_ids:
                seq.first_token_at = now
            seq.output_ids.append(tok)
            if tok == self.eos and not self.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason:
                seq.finished_at = now

    def _prefill(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        tokens = self._step(seqs, [s.prompt_ids for s in seqs])
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prefill_tokens += sum(len(s.prompt_ids) for s in seqs)
        self._append(seqs, tokens)

    def _decode(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        tokens = self._step(seqs, [[s.output_ids[-1]] for s in seqs])
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_tokens += len(seqs)
        self._append(seqs, tokens)
