"""Page accounting for the paged cache, plain Python (no torch): reference counts and a prefix cache.

A full page is identified by a chained hash: hash((hash of the previous page, the page's tokens)), so a
page matches only when its whole prefix matches. A hit is confirmed by comparing the tokens, so a hash
collision can never hand a sequence someone else's latents. Pages nobody references stay cached, in LRU
order, until a new allocation needs them.

With KV tiers below the device (kvcache/tiers/), a manager built with the model's identity digest as
`tier_root` also gives every full page its tier entry (a strong chained key, the parent's key, the
tokens) and records the pages that became full (`take_new_pages`, for write-through) and the cached
pages it evicted (`take_evicted`, for write-back; their latents are intact until the next step writes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from moe_pd.kvcache.tiers.identity import chain_keys, page_key

TierEntry = tuple[bytes, bytes, tuple[int, ...]]
"""(page key, parent key, tokens): how the KV tiers name a full page."""


class OutOfBlocks(RuntimeError):
    """The pool has fewer free pages than asked for."""


@dataclass
class Page:
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] | None = None
    entry: TierEntry | None = None
    """The page's tier entry (only when the manager has a tier root)."""


CHAIN_ROOT = 0x6D6F655F7064
"""The first page's `previous`. Not None: on Python 3.11 hash(None) is the object's address, different in
every process, while tuples of ints hash the same everywhere (PYTHONHASHSEED salts only str and bytes)."""


def chain_hash(previous: int, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


def full_pages(token_ids: list[int], block_size: int) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(chained hash, tokens) of each full leading page of `token_ids`, lazily (a lookup may stop early)."""
    previous = CHAIN_ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = tuple(token_ids[start : start + block_size])
        previous = chain_hash(previous, tokens)
        yield previous, tokens


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True,
                 tier_root: bytes | None = None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be > 0")
        self.num_blocks, self.block_size, self.enabled = num_blocks, block_size, enable_prefix_cache
        self.tier_root = tier_root if enable_prefix_cache else None
        self._new_full: list[tuple[int, TierEntry]] = []
        self._evicted: list[tuple[int, TierEntry]] = []
        self._stored: list[bytes] = []
        self._removed: list[bytes] = []
        self.pages = [Page() for _ in range(num_blocks)]
        self._free = list(range(num_blocks - 1, -1, -1))  # never used or holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced but cached, oldest first
        self._by_hash: dict[int, int] = {}

    # accounting ----------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages an allocation can take now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            old = self.pages[page]
            if old.hash is not None and self._by_hash.get(old.hash) == page:
                del self._by_hash[old.hash]
            if old.entry is not None:
                self._evicted.append((page, old.entry))
                self._removed.append(old.entry[0])
        else:
            raise OutOfBlocks(f"no free pages ({self.num_blocks} in use)")
        self.pages[page] = Page(ref_count=1)
        return page

    def _ref(self, page: int) -> None:
        if self.pages[page].ref_count == 0:
            self._evictable.pop(page, None)
        self.pages[page].ref_count += 1

    # sequences ------------------------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached pages holding the longest run of full leading blocks of `token_ids` (not referenced yet)."""
        if not self.enabled:
            return []
        pages = []
        for h, tokens in full_pages(token_ids, self.block_size):
            page = self._by_hash.get(h)
            if page is None or self.pages[page].tokens != tokens:
                break
            pages.append(page)
        return pages

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached pages a new sequence may reuse: its matched prefix, stopping at least one token
        before the end so there is always a token to compute."""
        return self.match_prefix(token_ids)[: (len(token_ids) - 1) // self.block_size]

    def admit(self, token_ids: list[int], need_tokens: int, hits: list[int] | None = None) -> tuple[list[int], int]:
        """Pages for a new sequence: reuses its cached prefix (`hits`, from `cached_prefix`, looked up when
        not given), then allocates the rest up to `need_tokens`.
        Returns (block table, tokens served by the cache). All or nothing: raises OutOfBlocks."""
        if hits is None:
            hits = self.cached_prefix(token_ids)
        extra = self.blocks_for(need_tokens) - len(hits)
        reclaimable = sum(1 for p in hits if self.pages[p].ref_count == 0)
        if extra > self.num_free - reclaimable:
            raise OutOfBlocks(f"need {extra} new pages, {self.num_free - reclaimable} free")
        for page in hits:
            self._ref(page)
        table = hits + [self._take() for _ in range(max(extra, 0))]
        return table, len(hits) * self.block_size

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > self.num_free:
            raise OutOfBlocks(f"need {missing} pages, {self.num_free} free")
        table.extend(self._take() for _ in range(max(missing, 0)))

    def commit(self, table: list[int], token_ids: list[int], num_computed: int, offer: bool = True) -> None:
        """Registers the full pages among the first `num_computed` tokens in the prefix cache. `offer`:
        new full pages are offered to the tiers (take_new_pages); False for pages promoted from them."""
        if not self.enabled:
            return
        previous, parent = CHAIN_ROOT, self.tier_root
        for i in range(num_computed // self.block_size):
            page = self.pages[table[i]]
            if page.hash is None:  # pages registered before keep their hash: only new full pages are hashed
                tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
                page.hash, page.tokens = chain_hash(previous, tokens), tokens
                self._by_hash.setdefault(page.hash, table[i])
                if parent is not None:
                    page.entry = (page_key(parent, tokens), parent, tokens)
                    self._stored.append(page.entry[0])
                    if offer:
                        self._new_full.append((table[i], page.entry))
            previous, parent = page.hash, page.entry[0] if page.entry else None

    def truncate(self, table: list[int], num_tokens: int) -> int:
        """Keeps the pages `num_tokens` tokens need and releases the rest from the end of the table (as `free`
        does): the rollback of a speculative step's rejected positions. Their cache rows need no clearing:
        attention reads a sequence's rows only below its length, and the next step overwrites them.
        Returns the number of pages released."""
        keep = self.blocks_for(num_tokens)
        tail = table[keep:]
        del table[keep:]
        released = len(tail)
        self.free(tail)
        return released

    def free(self, table: list[int]) -> None:
        """Drops the sequence's references; cached pages become evictable (LRU), others free."""
        for page_id in reversed(table):
            page = self.pages[page_id]
            page.ref_count -= 1
            if page.ref_count < 0:
                raise RuntimeError(f"page {page_id} freed more often than referenced")
            if page.ref_count == 0:
                if page.hash is not None and self._by_hash.get(page.hash) == page_id:
                    self._evictable[page_id] = None
                else:
                    if page.entry is not None:  # a duplicate of a cached page: its stored event ends here
                        self._removed.append(page.entry[0])
                    self.pages[page_id] = Page()
                    self._free.append(page_id)
        table.clear()

    # tiers ----------------------------------------------------------------------------------------------
    def tier_entries(self, token_ids: list[int], hits: list[int]) -> Iterator[TierEntry]:
        """Tier entries of the pages after the device hits `hits` (from cached_prefix) that a new sequence
        could still take from the tiers (stopping a token before the end, as cached_prefix does), lazily."""
        if self.tier_root is None:
            return iter(())
        parent = self.pages[hits[-1]].entry[0] if hits else self.tier_root
        limit = (len(token_ids) - 1) // self.block_size - len(hits)
        return chain_keys(parent, token_ids, self.block_size, len(hits), max(limit, 0))

    def take_new_pages(self) -> list[tuple[int, TierEntry]]:
        """(page, entry) of the pages that became full since the last call (write-through offers)."""
        out, self._new_full = self._new_full, []
        return out

    def take_events(self) -> tuple[list[bytes], list[bytes]]:
        """(keys of pages registered, keys of cached pages evicted) since the last call: what this device
        cache holds, as the KV events a router learns from (vLLM's BlockStored / BlockRemoved)."""
        out = self._stored, self._removed
        self._stored, self._removed = [], []
        return out

    def take_evicted(self) -> list[tuple[int, TierEntry]]:
        """(page, entry) of the cached pages evicted since the last call; their latents are intact until the
        next step runs (write-back offers must be issued before it)."""
        out, self._evicted = self._evicted, []
        return out
