"""The router's estimate of what each prefill worker's prefix cache holds.

Approximate, from what the router itself sent where (llm-d's "approximate prefix cache" scorer and
Dynamo's KV router without events do the same): when a prompt goes to a worker, the hashes of its full
blocks (``prefix_hash``, the chain the workers' caches key by) are recorded for that worker, in an LRU
bounded by the worker's cache size. A worker evicts on its own schedule, so the estimate can be
optimistic; it costs no extra traffic, needs no event stream that could lag or be lost, and is
right exactly when it matters most (a conversation's next turn, a shared system prompt under steady
load). A worker that leaves, restarts or fails a readiness check is forgotten.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvrelay_worker.prefix_hash import BlockHash, chain_hashes, root_hash


class PrefixIndex:
    """Per worker address, the block hashes of prompts routed there, least recently used first."""

    def __init__(self, block_size: int = 16, capacity_blocks: int = 1024) -> None:
        if block_size < 1 or capacity_blocks < 1:
            raise ValueError("block_size and capacity_blocks must be >= 1")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._root = root_hash("router")  # the router's own namespace: it only compares with itself
        self._blocks: dict[str, OrderedDict[BlockHash, None]] = {}

    def hashes(self, token_ids: Sequence[int]) -> list[BlockHash]:
        """The prompt's full-block hash chain."""
        return chain_hashes(token_ids, self.block_size, self._root)

    def cached_tokens(self, address: str, hashes: Sequence[BlockHash]) -> int:
        """Tokens of the longest prefix of ``hashes`` sent to ``address`` (and not aged out since)."""
        blocks = self._blocks.get(address)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n * self.block_size

    def record(self, address: str, hashes: Sequence[BlockHash]) -> None:
        """``address`` now computes (and will cache) these blocks."""
        blocks = self._blocks.setdefault(address, OrderedDict())
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def forget(self, address: str) -> None:
        self._blocks.pop(address, None)

    def num_blocks(self, address: str) -> int:
        return len(self._blocks.get(address) or ())
