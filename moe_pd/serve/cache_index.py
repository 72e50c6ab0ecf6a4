"""Which caches hold which KV pages, learned from the caches' own reports (no torch, no I/O).

Every rank reports the pages its device cache stored and evicted, and the pages it wrote into or evicted
from its node's DRAM and disk tiers, by their chained tier keys (moe_pd.kvcache.tiers.identity: the same in
every process, unlike Python's `hash`). A leader keeps this index per rank to place prompts on the rank
that holds their prefix; a router keeps it per instance and per tier (a node's DRAM pool or disk directory,
named alike by every instance that shares it) to send a prompt where the longest prefix is cached, on the
device or in a tier below it. This is how Dynamo's KV router and SGLang's cache-aware router work with
the engines' KV events; moe_pd's earlier PrefixIndex guessed from what it had sent instead, and could not
know what an instance evicted or what its node's tiers hold.

An owner's device pages are counted (several ranks, or several pages of one rank, may hold the same key:
each stored is matched by one removed); a tier holds a key or not. Each owner keeps at most `capacity`
keys, the oldest dropped first: the index may forget a page it holds (a missed hit, a recompute), and may
keep one already gone when a report was lost (a miss at admission, also a recompute), never a wrong token:
the instance checks every page it takes by its tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

from moe_pd.kvcache.tiers.identity import chain_keys


def prompt_keys(root: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained keys of the full pages a cache could serve for `token_ids` (at least one token is left
    to compute, as the engine's admission leaves it)."""
    return [key for key, _, _ in chain_keys(root, token_ids, block_size, 0, (len(token_ids) - 1) // block_size)]


class CacheIndex:
    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._held: dict[Hashable, dict[bytes, int]] = {}

    def apply(self, owner: Hashable, stored: Iterable[bytes], removed: Iterable[bytes], counted: bool = True) -> None:
        """An owner's report. `counted`: its keys are counted (device pages); else held or not (a tier)."""
        held = self._held.setdefault(owner, {})
        for key in stored:
            count = held.pop(key, 0)  # re-inserted: the most recent
            held[key] = count + 1 if counted else 1
        for key in removed:
            count = held.get(key, 0) - 1
            if count > 0:
                held[key] = count
            else:
                held.pop(key, None)
        while len(held) > self.capacity:
            del held[next(iter(held))]

    def forget(self, owner: Hashable) -> None:
        self._held.pop(owner, None)

    def keys(self, owner: Hashable) -> list[bytes]:
        """Everything the owner holds (a leader's snapshot for a router that just said Hello)."""
        return list(self._held.get(owner, ()))

    def __len__(self) -> int:
        return sum(len(h) for h in self._held.values())

    def run(self, keys: Sequence[bytes], owners: Iterable[Hashable]) -> int:
        """How many leading pages of `keys` some owner in `owners` holds (a prefix may lie partly on the
        device and partly in a tier)."""
        holders = [self._held[o] for o in owners if o in self._held]
        n = 0
        while n < len(keys) and any(keys[n] in h for h in holders):
            n += 1
        return n
