"""Fixed-size KV blocks with reference counts. Torch-free; block 0 is the null block.

Allocation returns ``None`` on shortage: running out of blocks is a normal outcome the
scheduler handles (wait, preempt or refuse), not an exception.
"""

from __future__ import annotations

from collections import deque

NULL_BLOCK_ID = 0


class BlockPool:
    """Hands out block ids 1..num_blocks-1; a block returns to the free queue when its count hits 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks {num_blocks} too small: block 0 is reserved, need at least 2")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, 0..1."""
        return self.num_used_blocks / self.num_usable_blocks

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free blocks (ref count 1 each), or None if fewer are free."""
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self.ref_counts[i] = 1
        return ids

    def incref(self, block_ids: list[int]) -> None:
        """Share blocks with another owner."""
        for i in block_ids:
            if self.ref_counts[i] <= 0:
                raise ValueError(f"block {i} is free; cannot share it")
            self.ref_counts[i] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; free them tail first so a table's head blocks are
        the last to be reused."""
        for i in reversed(block_ids):
            if i == NULL_BLOCK_ID or self.ref_counts[i] <= 0:
                raise ValueError(f"double free or null block: block {i} has ref count {self.ref_counts[i]}")
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self._free.append(i)
