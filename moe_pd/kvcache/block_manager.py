"""Page accounting for the paged cache, in plain Python (no torch): a free list and per-sequence tables."""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """The pool has fewer free pages than asked for."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"need {count} pages, {len(self._free)} of {self.num_blocks} free")
        return [self._free.pop() for _ in range(count)]

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Appends pages to `table` until it can hold `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()
