"""An open-addressing hash table from 128-bit page keys to pool slots, over arrays any process can map.

Buckets hold a slot number or -1; a slot's key lives in the pool's key array, so the table itself is one
int32 array. Linear probing with backward-shift deletion (no tombstones, so lookups never slow down as
entries come and go). At most half the buckets are used: the pool sizes the table at twice its slots.
The caller serialises every call (the pool's lock); nothing here locks.
"""

from __future__ import annotations

import numpy as np

EMPTY = -1


def key_words(key: bytes) -> tuple[int, int]:
    """A 16-byte key as the two little-endian 64-bit words the arrays store."""
    return int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")


class SlotTable:
    def __init__(self, buckets: np.ndarray, keys: np.ndarray) -> None:
        """`buckets`: int32 [B] with B a power of two; `keys`: uint64 [num_slots, 2], the slots' keys."""
        if buckets.size & (buckets.size - 1):
            raise ValueError(f"{buckets.size} buckets: must be a power of two")
        self.buckets, self.keys, self.mask = buckets, keys, buckets.size - 1

    def _home(self, word0: int) -> int:
        return word0 & self.mask

    def find(self, words: tuple[int, int]) -> int:
        """The slot holding the key, or -1."""
        i = self._home(words[0])
        while True:
            slot = int(self.buckets[i])
            if slot == EMPTY:
                return EMPTY
            if int(self.keys[slot, 0]) == words[0] and int(self.keys[slot, 1]) == words[1]:
                return slot
            i = (i + 1) & self.mask

    def insert(self, words: tuple[int, int], slot: int) -> None:
        """Maps the key (already written to keys[slot]) to `slot`; the key must not be present."""
        i = self._home(words[0])
        while int(self.buckets[i]) != EMPTY:
            i = (i + 1) & self.mask
        self.buckets[i] = slot

    def delete(self, words: tuple[int, int]) -> bool:
        """Removes the key; returns whether it was there. Later entries of the probe run shift back into
        the hole when their home bucket allows it, so every remaining key stays reachable."""
        i = self._home(words[0])
        while True:
            slot = int(self.buckets[i])
            if slot == EMPTY:
                return False
            if int(self.keys[slot, 0]) == words[0] and int(self.keys[slot, 1]) == words[1]:
                break
            i = (i + 1) & self.mask
        hole, j = i, i
        while True:
            j = (j + 1) & self.mask
            slot = int(self.buckets[j])
            if slot == EMPTY:
                break
            home = self._home(int(self.keys[slot, 0]))
            # the entry at j may move to the hole unless its home lies cyclically in (hole, j]
            if (hole < j and (home <= hole or home > j)) or (hole > j and home <= hole and home > j):
                self.buckets[hole] = slot
                hole = j
        self.buckets[hole] = EMPTY
        return True

    def entries(self) -> int:
        return int(np.count_nonzero(self.buckets != EMPTY))
