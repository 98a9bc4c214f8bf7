"""Fixed-size KV blocks with reference counts and an optional prefix cache. Torch-free; block 0 is
the null block.

Allocation returns ``None`` on shortage: running out of blocks is a normal outcome the scheduler
handles (wait, preempt or refuse), not an exception.

Prefix cache: a full block whose KV is computed can be registered under its content hash
(``prefix_hash``). When its last owner frees it, it joins the free queue but keeps its hash, so a
later request with the same prefix can take it back (``touch``) until the block is handed out again:
the free queue is least recently freed first, so that is LRU eviction of cached blocks. A table is
freed tail first, so a prefix's first blocks are the last to go and a chain stays usable longest.
"""

from __future__ import annotations

from collections import OrderedDict

from kvrelay_worker.prefix_hash import BlockHash

NULL_BLOCK_ID = 0


class BlockPool:
    """Hands out block ids 1..num_blocks-1; a block returns to the free queue when its count hits 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks {num_blocks} too small: block 0 is reserved, need at least 2")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # head = the next block to hand out (least recently freed); O(1) removal from the middle
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}  # block hash -> the block that holds that KV
        self.num_evictions = 0  # cached blocks handed out for other KV, since start

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, cached ones included (they are evicted when needed)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or free."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, 0..1 (cached free blocks count as free)."""
        return self.num_used_blocks / self.num_usable_blocks

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free blocks (ref count 1 each), evicting cached ones, or None if fewer are free."""
        if n > len(self._free):
            return None
        ids = []
        for _ in range(n):
            i = self._free.popitem(last=False)[0]
            h = self._hash_of[i]
            if h is not None:
                self._hash_of[i] = None
                del self._cached[h]
                self.num_evictions += 1
            self.ref_counts[i] = 1
            ids.append(i)
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
                self._free[i] = None

    # ---- prefix cache ------------------------------------------------------------------------------
    def lookup(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest cached prefix of ``hashes`` (not taken: see ``touch``)."""
        hits = []
        for h in hashes:
            i = self._cached.get(h)
            if i is None:
                break
            hits.append(i)
        return hits

    def num_free_after_touch(self, block_ids: list[int]) -> int:
        """Free blocks left once ``block_ids`` are taken (the free ones among them leave the queue)."""
        return len(self._free) - sum(1 for i in block_ids if self.ref_counts[i] == 0)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks, free or in use (``lookup``'s result)."""
        for i in block_ids:
            if self.ref_counts[i] == 0:
                del self._free[i]
            self.ref_counts[i] += 1

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Record that ``block_id`` holds the KV named by ``block_hash``. A block already registered, or
        a hash another block already holds (two requests computed the same prefix at once), is left as is."""
        if self._hash_of[block_id] is None and block_hash not in self._cached:
            self._hash_of[block_id] = block_hash
            self._cached[block_hash] = block_id
