"""Small drivers around moe_pd's model for tests: one-shot forward and greedy re-forward."""

from __future__ import annotations

import torch

from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache


def fresh_cache(model, num_blocks: int = 64, block_size: int = 4) -> PagedLatentCache:
    cfg = model.cfg
    weight = model.model.embed_tokens.weight  # the activation dtype (FP8 expert weights are not)
    return PagedLatentCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                            dtype=weight.dtype, device=weight.device)


def forward_logits(model, prompts: list[list[int]], block_size: int = 4, attn_mode: str = "auto") -> list[torch.Tensor]:
    """Logits of every position of every prompt, all prompts in one varlen forward on a fresh cache."""
    cache = fresh_cache(model, num_blocks=sum(-(-len(p) // block_size) for p in prompts) + 1, block_size=block_size)
    tables, next_block = [], 0
    for p in prompts:
        n = -(-len(p) // block_size)
        # Hand out pages in reverse so tables are not contiguous: exercises the page indirection.
        tables.append(list(range(next_block + n - 1, next_block - 1, -1)))
        next_block += n
    device = cache.kv_LPSW.device
    batch = AttentionBatch.build(tables, [0] * len(prompts), [len(p) for p in prompts], block_size, device)
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    with torch.inference_mode():
        logits = model.logits(model(ids, batch, cache, attn_mode))
    return list(logits.split([len(p) for p in prompts]))


def greedy_reforward(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding that re-runs the whole sequence every step (no cache reuse): the slow reference."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(forward_logits(model, [seq])[0][-1].argmax()))
    return seq[len(prompt):]


def mtp_logits(model, ids: list[int], chunks=(None,), block_size: int = 4) -> torch.Tensor:
    """[len(ids) - 1, V]: the main model over `ids`, then the MTP module over the same positions (row i: token
    i + 1 and the main state of i, predicting token i + 2), through a fresh paged cache, the prompt cut at
    `chunks` as chunked prefill."""
    cfg = model.cfg
    pages = -(-len(ids) // block_size)
    weight = model.model.embed_tokens.weight
    cache = PagedLatentCache(model.num_cache_layers, pages + 1, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                             dtype=weight.dtype, device=weight.device)
    table = list(range(pages, 0, -1))  # not contiguous: exercises the page indirection
    cuts = [0, *[c for c in chunks if c is not None], len(ids) - 1]
    out = []
    with torch.inference_mode():
        for start, end in zip(cuts, cuts[1:]):
            batch = AttentionBatch.build([table], [start], [end - start], block_size, weight.device)
            states = model(torch.tensor(ids[start:end], device=weight.device), batch, cache)
            nxt = torch.tensor(ids[start + 1 : end + 1], device=weight.device)
            out.append(model.mtp[0].logits(model.mtp_forward(nxt, states, batch, cache)))
    return torch.cat(out)
