"""Load-balancing decisions of the PD cluster, as pure functions on plain data (no I/O, no torch).

DeepSeek's inference system ("DeepSeek-V3/R1 Inference System Overview", deepseek-ai/open-infra-index) balances,
per instance:
- prefill: core-attention work and input tokens per GPU (rank);
- decode: KV-cache usage and the number of requests per GPU;
and the router sends a prompt to the prefill instance that already caches its longest prefix (what each
instance caches: moe_pd.serve.cache_index, from the instances' own reports).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefillRankLoad:
    rank: int
    queued_tokens: int = 0
    """Uncached prompt tokens assigned and not yet prefilled."""
    attention_work: float = 0.0
    """Core-attention work queued: sum over prompts of new x (cached + new) token pairs."""


@dataclass
class DecodeRankLoad:
    rank: int
    kv_pages_used: int
    kv_pages_total: int
    running: int
    max_running: int

    @property
    def free_pages(self) -> int:
        return self.kv_pages_total - self.kv_pages_used


def attention_work(prompt_len: int, cached_len: int) -> float:
    """Query x key pairs of causal attention over the uncached part of a prompt."""
    new = prompt_len - cached_len
    return new * cached_len + new * (new + 1) / 2


def assign_prefill(requests: list[tuple[str, int, int | dict[int, int]]], ranks: list[PrefillRankLoad],
                   attention_weight: float = 1.0) -> dict[str, int]:
    """(request id, prompt length, cached length) -> the DP rank to prefill it on. The cached length is one
    number, or per rank ({rank: cached tokens}, as the leader's CacheIndex gives it). Largest work first, each onto
    the rank where it ends up least loaded, by uncached tokens plus weighted attention work normalised to
    tokens; ties go to the lowest rank. Updates `ranks` in place."""
    if not ranks:
        raise ValueError("no prefill ranks")

    def cached_on(cached: int | dict[int, int], rank: int) -> int:
        return cached.get(rank, 0) if isinstance(cached, dict) else cached

    def least_cached(r: tuple[str, int, int | dict[int, int]]) -> int:
        return r[1] - max((cached_on(r[2], x.rank) for x in ranks), default=0)

    out = {}
    for rid, length, cached in sorted(requests, key=lambda r: (-least_cached(r), r[0])):
        scale = max(length, 1)  # attention pairs / prompt length ~ tokens

        def cost(r: PrefillRankLoad) -> tuple[float, int]:
            hit = cached_on(cached, r.rank)
            return (r.queued_tokens + length - hit
                    + attention_weight * (r.attention_work + attention_work(length, hit)) / scale, r.rank)

        best = min(ranks, key=cost)
        hit = cached_on(cached, best.rank)
        best.queued_tokens += length - hit
        best.attention_work += attention_work(length, hit)
        out[rid] = best.rank
    return out


def pick_decode_rank(ranks: list[DecodeRankLoad], need_pages: int) -> int | None:
    """The decode rank for a new request: it must have `need_pages` free pages and a free slot; among
    those, the lowest KV usage plus request share, ties to the lowest rank. None: every rank is full
    (the router answers 503 or queues)."""
    fits = [r for r in ranks if r.free_pages >= need_pages and r.running < r.max_running]
    if not fits:
        return None
    return min(fits, key=lambda r: (r.kv_pages_used / r.kv_pages_total + r.running / r.max_running, r.rank)).rank


def pick_prefill_instance(cached_prefix: dict[str, int], queued_tokens: dict[str, int]) -> str:
    """The prefill instance for a prompt: the longest cached prefix wins; then the shortest queue; then
    the name. `cached_prefix` maps instance -> tokens of the prompt it already caches."""
    if not queued_tokens:
        raise ValueError("no prefill instances")
    return min(queued_tokens, key=lambda i: (-cached_prefix.get(i, 0), queued_tokens[i], i))
