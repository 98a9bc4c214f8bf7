"""Pure byte-run planning: which contiguous bytes of the holder's kv_cache go where in the reader's.

Both sides hold `[num_layers, 2, num_blocks, num_kv_heads_local, block_size, head_dim]`. One
(layer, k|v, block) on a rank is a contiguous span of all its local heads, so a reader rank reads
one contiguous run per (layer, k|v, block) from each holder rank that has some of its heads:

    holder TP=1 -> reader TP=2 (4 heads):      holder TP=2 -> reader TP=1:
    holder rank 0:  [ h0 h1 h2 h3 ]             holder rank 0: [ h0 h1 ]  holder rank 1: [ h2 h3 ]
    reader rank 0:  [ h0 h1 ]  (offset 0)       reader rank 0: [ h0 h1 | h2 h3 ]  two sources, one
    reader rank 1:  [ h2 h3 ]  (offset 2)                       run each into its half of the block
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .handle import KVLayout, KVLayoutMismatch, check_compatible

# A run plan is an int64 array of rows (src offset, dst offset, length) in bytes from each tensor's
# base, ordered by (layer, k|v, block index); numpy keeps planning a 2,048-token prompt (8,192 raw
# runs) well under a millisecond.
RunPlan = np.ndarray


@dataclass(frozen=True)
class SourceSlice:
    """The heads one reader rank reads from one holder rank."""

    holder_rank: int
    holder_head: int  # first head on the holder rank (local index)
    reader_head: int  # where it lands on the reader rank (local index)
    num_heads: int


def source_slices(holder: KVLayout, reader: KVLayout, reader_rank: int) -> list[SourceSlice]:
    """Every holder rank that has some of `reader_rank`'s heads, in head order."""
    check_compatible(holder, reader)
    if not 0 <= reader_rank < reader.tp_size:
        raise KVLayoutMismatch(f"reader rank {reader_rank} outside tp_size {reader.tp_size}")
    first = reader_rank * reader.num_kv_heads_local
    end = first + reader.num_kv_heads_local
    slices, head = [], first
    while head < end:
        rank, offset = divmod(head, holder.num_kv_heads_local)
        n = min(holder.num_kv_heads_local - offset, end - head)
        slices.append(SourceSlice(rank, offset, head - first, n))
        head += n
    return slices


def source_slice(holder: KVLayout, reader: KVLayout, reader_rank: int, holder_rank: int) -> SourceSlice:
    """The slice `reader_rank` reads from `holder_rank`; KVLayoutMismatch if it reads nothing there."""
    for s in source_slices(holder, reader, reader_rank):
        if s.holder_rank == holder_rank:
            return s
    raise KVLayoutMismatch(f"reader rank {reader_rank} reads nothing from holder rank {holder_rank}")


def readers_of(holder: KVLayout, reader: KVLayout, holder_rank: int) -> list[int]:
    """The reader ranks that read from `holder_rank` (the holder releases after all of them)."""
    first = holder_rank * holder.num_kv_heads_local
    end = first + holder.num_kv_heads_local
    per = reader.num_kv_heads_local
    return list(range(first // per, -(-end // per)))


def slice_bytes(holder: KVLayout, source: SourceSlice, num_blocks: int) -> int:
    """Bytes one source slice moves for `num_blocks` blocks (all layers, K and V)."""
    return (
        holder.num_layers
        * 2
        * num_blocks
        * source.num_heads
        * holder.block_size
        * holder.head_dim
        * holder.itemsize
    )


def plan_runs(
    holder: KVLayout,
    holder_num_blocks: int,
    holder_block_ids: list[int],
    reader: KVLayout,
    reader_num_blocks: int,
    reader_rank: int,
    dst_block_ids: list[int],
    holder_rank: int | None = None,
) -> RunPlan:
    """(src, dst, length) rows for one reader rank from one holder rank (default: its first source):
    one per (layer, k|v, block), consecutive blocks merged."""
    if len(holder_block_ids) != len(dst_block_ids):
        raise KVLayoutMismatch(
            f"{len(holder_block_ids)} blocks (holder) != {len(dst_block_ids)} destination blocks (reader)"
        )
    if holder_rank is None:
        source = source_slices(holder, reader, reader_rank)[0]
    else:
        source = source_slice(holder, reader, reader_rank, holder_rank)
    src_ids = _checked_ids(holder_block_ids, holder_num_blocks, "holder")
    dst_ids = _checked_ids(dst_block_ids, reader_num_blocks, "reader")
    head_bytes = holder.block_size * holder.head_dim * holder.itemsize
    run_len = source.num_heads * head_bytes
    src_block = holder.num_kv_heads_local * head_bytes
    dst_block = reader.num_kv_heads_local * head_bytes
    planes = np.arange(holder.num_layers * 2, dtype=np.int64)[:, None]  # (layer, k|v) planes, in order
    if run_len == src_block == dst_block:
        # The reader takes whole blocks, so consecutive ids on both sides are one run: coalesce the
        # ids once rather than every plane's (a 2,048-token prompt is 1 segment instead of 8,192 runs).
        # Runs never merge across planes: block 0, the null block, is never sent.
        starts = np.flatnonzero((np.diff(src_ids, prepend=-2) != 1) | (np.diff(dst_ids, prepend=-2) != 1))
        lengths = np.diff(np.append(starts, len(src_ids))) * run_len
        src_ids, dst_ids = src_ids[starts], dst_ids[starts]
    else:
        lengths = np.full(len(src_ids), run_len, dtype=np.int64)
    src = (
        planes * (holder_num_blocks * src_block)
        + source.holder_head * head_bytes
        + src_ids[None, :] * src_block
    )
    dst = (
        planes * (reader_num_blocks * dst_block)
        + source.reader_head * head_bytes
        + dst_ids[None, :] * dst_block
    )
    return np.stack([src.ravel(), dst.ravel(), np.broadcast_to(lengths, src.shape).ravel()], axis=1)


def _checked_ids(block_ids: list[int], num_blocks: int, side: str) -> np.ndarray:
    ids = np.asarray(block_ids, dtype=np.int64)
    bad = ids[(ids <= 0) | (ids >= num_blocks)]  # block 0 is the engine's null block
    if bad.size:
        raise KVLayoutMismatch(f"{side} block id {int(bad[0])} outside 1..{num_blocks - 1}")
    return ids
