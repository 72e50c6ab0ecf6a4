"""Offline generation: a batch of prompts through an LLMEngine, results in prompt order."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.overlap import OverlapConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.core.request import SamplingParams, capacity_problem, prompt_problem
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.parallel.step_sync import StepSync


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


def check_prompts(prompts: list[list[int]], vocab_size: int, max_context: int) -> None:
    for i, ids in enumerate(prompts):
        if problem := prompt_problem(ids, vocab_size, max_context):
            raise PromptError(f"prompt {i} {problem}")


class OfflineEngine:
    def __init__(self, model: DeepseekForCausalLM, kv: KVCacheConfig, max_batch_size: int,
                 device: torch.device | str = "cpu", sync: StepSync | None = None,
                 overlap: OverlapConfig | None = None, max_num_batched_tokens: int = 4096,
                 decode_graphs: bool = False, num_draft_tokens: int = 0) -> None:
        self.engine = LLMEngine(model, kv, max_batch_size, max_num_batched_tokens, device, sync, overlap,
                                decode_graphs=decode_graphs, num_draft_tokens=num_draft_tokens)
        self.max_context = model.cfg.max_position_embeddings
        self.vocab_size = model.cfg.vocab_size

    @property
    def allocator(self):
        return self.engine.allocator

    @property
    def stats(self):
        return self.engine.stats

    @property
    def eos(self) -> int | None:
        return self.engine.eos

    @eos.setter
    def eos(self, value: int | None) -> None:
        self.engine.eos = value

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 indices: list[int] | None = None) -> list[Completion]:
        """Completions in prompt order. `indices` are the prompts' positions in the whole job (prompt i
        samples from a generator seeded sampling.seed + i, so batching never changes its tokens)."""
        check_prompts(prompts, self.vocab_size, self.max_context)
        indices = list(range(len(prompts))) if indices is None else indices
        params = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p)
        base_seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        alloc = self.engine.allocator
        for i, prompt in zip(indices, prompts, strict=True):  # every prompt is checked before any runs
            if problem := capacity_problem(len(prompt), sampling.max_new_tokens, alloc.block_size, self.max_context,
                                           alloc.num_blocks, self.engine.scheduler.lookahead):
                raise PromptError(f"prompt {i} {problem} (kvcache.num_blocks={alloc.num_blocks}); raise "
                                  "kvcache.num_blocks")
        seqs = {str(i): self.engine.add_request(str(i), prompt, sampling.max_new_tokens, params, base_seed + i,
                                                sampling.ignore_eos)
                for i, prompt in zip(indices, prompts, strict=True)}
        started = time.perf_counter()
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        while True:
            busy, outputs = self.engine.step()
            if not busy:
                break
            now = time.perf_counter()
            for out in outputs:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
        return [
            Completion(int(rid), s.prompt_ids, s.output_ids, s.finish_reason or "length",
                       first.get(rid, started) - started, last.get(rid, started) - first.get(rid, started),
                       s.num_cached_hit, s.num_preemptions)
            for rid, s in sorted(seqs.items(), key=lambda kv: int(kv[0]))
        ]
