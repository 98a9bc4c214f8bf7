"""Content hashes of full KV blocks, chained so that a block's hash names its whole prefix.

A block's KV depends on every token before it, so its identity is (the previous block's hash, its own
token ids), seeded by a salt that names whatever else changes the KV (the model and its dtype). The
engine keys its prefix cache by these hashes; the router computes the same ones to guess which
worker holds a prompt's prefix. sha256, not Python's hash(): a tenant must not be able to craft a
prompt whose block collides with another tenant's and read or poison its KV (vLLM's CVE-2025-25183).
Torch-free, so that the router process can use it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes  # 16 bytes of sha256: collisions need ~2**64 blocks


def root_hash(salt: str) -> BlockHash:
    """The parent of a sequence's first block."""
    return hashlib.sha256(b"kvrelay-prefix\0" + salt.encode()).digest()[:16]


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: BlockHash) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids``, the first chained on ``parent``."""
    n = len(token_ids) // block_size
    fmt = f"<{block_size}I"
    out: list[BlockHash] = []
    for b in range(n):
        block = struct.pack(fmt, *token_ids[b * block_size : (b + 1) * block_size])
        parent = hashlib.sha256(parent + block).digest()[:16]
        out.append(parent)
    return out
