"""How much a smarter eviction policy could gain over LRU on a workload: LRU against Belady's optimum.

One cache of `capacity` pages replays the requests: a request hits the leading run of its prompt's full
pages that the cache holds (a token short of the end, as the engine), then every page of its prompt and
answer is in the cache (computed or hit). LRU evicts the least recently used page; Belady's MIN evicts the
page whose next use is farthest (never again first), the offline optimum for per-page hits. With hits
counted as leading runs it is not provably optimal, but it knows the future: the gap between the two is
about the most a smarter online policy (LFU, ARC, reuse-distance predictors) could gain.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, defaultdict

from kv_workload import Turn

from moe_pd.kvcache.block_manager import full_pages

NEVER = float("inf")


def _pages(turns: list[Turn], bs: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per request: the chained hashes of the prompt pages a hit may cover, and of every full page after it."""
    hits, inserts = [], []
    for t in turns:
        prompt = list(t.prompt)
        hits.append([h for h, _ in full_pages(prompt[: (len(prompt) - 1) // bs * bs], bs)])
        inserts.append([h for h, _ in full_pages(prompt + list(t.output), bs)])
    return hits, inserts


def replay(turns: list[Turn], bs: int, capacity: int, policy: str) -> float:
    """Hit rate (prompt tokens served) of one cache of `capacity` pages under 'lru' or 'belady'."""
    hits, inserts = _pages(turns, bs)
    uses: dict[int, list[int]] = defaultdict(list)  # page -> requests whose hit range contains it, in order
    for r, pages in enumerate(hits):
        for h in pages:
            uses[h].append(r)
    cursor: dict[int, int] = defaultdict(int)

    def next_use(h: int, after: int) -> float:
        seq = uses.get(h, [])
        i = cursor[h]
        while i < len(seq) and seq[i] <= after:
            i += 1
        cursor[h] = i
        return seq[i] if i < len(seq) else NEVER

    lru: OrderedDict[int, None] = OrderedDict()
    heap: list[tuple[float, int, int]] = []  # (-next use, insertion order, page); stale entries skipped
    order = 0
    due: dict[int, float] = {}
    served = total = 0
    for r, t in enumerate(turns):
        cached = lru if policy == "lru" else due
        run = 0
        for h in hits[r]:
            if h not in cached:
                break
            run += 1
        served += run * bs
        total += len(t.prompt)
        for h in inserts[r]:
            if policy == "lru":
                lru[h] = None
                lru.move_to_end(h)
                if len(lru) > capacity:
                    lru.popitem(last=False)
            else:
                due[h] = next_use(h, r)
                heapq.heappush(heap, (-due[h], order, h))  # ties by insertion order, not by hash value
                order += 1
                while len(due) > capacity:
                    neg, _, victim = heapq.heappop(heap)
                    if due.get(victim) == -neg:
                        del due[victim]
    return served / max(total, 1)
