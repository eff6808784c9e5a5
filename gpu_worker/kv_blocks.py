"""Bookkeeping of the paged KV cache: which fixed-size blocks are free. The cache tensor itself lives in the model."""

from __future__ import annotations


class KVBlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        # popped from the end, so the first blocks handed out are 0, 1, 2 ...
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def allocate(self, n_blocks: int) -> list[int] | None:
        """n_blocks blocks, or None (and nothing taken) when fewer are free."""
        if n_blocks > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n_blocks)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        # a block freed twice would later be handed to two sequences at once and corrupt both
        stray = [b for b in blocks if b not in self._used]
        if stray or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing blocks that are not allocated: {sorted(stray) or blocks}")
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))
