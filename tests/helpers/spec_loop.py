"""A minimal speculative generation loop over MTPSpeculator for tests: one batched prefill, then verification
steps, pages grown before each step and rolled back after it (the engine's job, reduced to its bones)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_pd.engine.sampler import SamplingParams, sample
from moe_pd.engine.spec.mtp_step import Drafts, MTPSpeculator
from moe_pd.kvcache.block_manager import BlockManager
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache


@dataclass
class SpecRun:
    outputs: list[list[int]]
    accepted: list[list[int]] = field(default_factory=list)
    """Per step, drafts accepted per running sequence."""
    first_drafts: list[list[int]] = field(default_factory=list)
    """Per step, the first draft of every running sequence (after that step)."""
    pages_free_at_end: int = 0
    num_blocks: int = 0


def spec_generate(model, prompts: list[list[int]], num_drafts: int, max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), seed: int = 0, block_size: int = 4,
                  force_drafts=None) -> SpecRun:
    """Greedy or sampled generation of `max_new_tokens` per prompt with K = num_drafts. `force_drafts(i, n)`,
    when given, replaces the drafts of sequence i of length n (tests of the acceptance path)."""
    cfg, k = model.cfg, num_drafts
    num_blocks = sum(-(-(len(p) + max_new_tokens + 2 * k) // block_size) for p in prompts) + 2
    cache = PagedLatentCache(model.num_cache_layers, num_blocks, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    bm = BlockManager(num_blocks, block_size, enable_prefix_cache=False)
    spec = MTPSpeculator(model, cache, k)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    plist = [params] * len(prompts)
    tables = [bm.admit(p, len(p) + 2 * k)[0] for p in prompts]
    with torch.inference_mode():
        batch = AttentionBatch.build(tables, [0] * len(prompts), [len(p) for p in prompts], block_size)
        states = model(torch.tensor([t for p in prompts for t in p]), batch, cache)
        last_rows = batch.query_starts_B + batch.query_lens_B - 1
        first = sample(model.logits(states[last_rows]), plist, gens)
        next_ids = torch.tensor([t for p, f in zip(prompts, first) for t in p[1:] + [f]])
        drafts = spec.after_prefill(batch, states, next_ids, range(len(prompts)), plist, gens)
    run = SpecRun([[f] for f in first])
    lengths = [len(p) + 1 for p in prompts]
    live = list(range(len(prompts)))
    tokens_BK, probs_BKV = drafts.tokens_BK, drafts.probs_BKV
    while live:
        for i in live:
            bm.grow(tables[i], lengths[i] + 2 * k - 1)
        if force_drafts is not None:
            tokens_BK = torch.tensor([force_drafts(i, lengths[i]) for i in live])
        with torch.inference_mode():
            verdict, drafts = spec.step([tables[i] for i in live], [lengths[i] for i in live],
                                        [run.outputs[i][-1] for i in live], Drafts(tokens_BK, probs_BKV),
                                        [plist[i] for i in live], [gens[i] for i in live])
        run.accepted.append(verdict.accepted)
        run.first_drafts.append(drafts.tokens_BK[:, 0].tolist())
        keep = []
        for row, i in enumerate(live):
            room = max_new_tokens - len(run.outputs[i])
            run.outputs[i] += verdict.tokens[row][:room]
            lengths[i] += verdict.accepted[row] + 1
            bm.truncate(tables[i], lengths[i])
            if len(run.outputs[i]) < max_new_tokens:
                keep.append(row)
            else:
                bm.free(tables[i])
        live = [live[r] for r in keep]
        tokens_BK = drafts.tokens_BK[keep]
        probs_BKV = None if drafts.probs_BKV is None else drafts.probs_BKV[keep]
    run.pages_free_at_end, run.num_blocks = bm.num_free, num_blocks
    return run
