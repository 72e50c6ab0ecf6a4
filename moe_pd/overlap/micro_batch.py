"""Cutting one step into two micro-batches balanced by tokens.

A prefill step is cut at half its tokens, which may fall inside a prompt: the prompt's first part goes to
micro-batch 0 and its rest to micro-batch 1, whose context then includes the first part (DeepSeek splits
the same prompt between micro-batches the same way). Micro-batch 0 always runs each layer's attention
before micro-batch 1 does, so the second part finds the first part's latents in the cache. A decode step
(one token per sequence) is cut between sequences. Rows keep their order: micro-batch 0's rows, then 1's.
"""

from __future__ import annotations

import torch

from moe_pd.kvcache.paged import AttentionBatch


def split_point(query_lens: list[int]) -> int:
    """Tokens in micro-batch 0: half the step, rounded up."""
    return (sum(query_lens) + 1) // 2


def split_step(ids_T: torch.Tensor, batch: AttentionBatch) -> list[tuple[torch.Tensor, AttentionBatch]]:
    """Two (ids, AttentionBatch) micro-batches covering the step's tokens in order. A verification step is
    cut between sequences (each keeps its queries together, as the decode kernel takes them)."""
    cut = split_point(batch.host_query_lens)
    if batch.verify:
        cut = (batch.num_seqs + 1) // 2 * batch.max_query_len
    parts: list[tuple[list, list, list]] = [([], [], []), ([], [], [])]
    seen = 0
    for table, ctx, n in zip(batch.host_tables, batch.host_context_lens, batch.host_query_lens, strict=True):
        first = min(max(cut - seen, 0), n)
        if first:
            parts[0][0].append(table)
            parts[0][1].append(ctx)
            parts[0][2].append(first)
        if n - first:
            parts[1][0].append(table)
            parts[1][1].append(ctx + first)
            parts[1][2].append(n - first)
        seen += n
    device = ids_T.device
    first_tokens = sum(parts[0][2])
    return [
        (ids_T[:first_tokens], AttentionBatch.build(*parts[0], batch.block_size, device, batch.verify)),
        (ids_T[first_tokens:], AttentionBatch.build(*parts[1], batch.block_size, device, batch.verify)),
    ]
