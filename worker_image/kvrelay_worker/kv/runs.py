"""Pure byte-run planning: which contiguous bytes of the holder's kv_cache go where in the reader's.

Both sides hold `[num_layers, 2, num_blocks, num_kv_heads_local, block_size, head_dim]`. One
(layer, k|v, block) on a rank is a contiguous span of all its local heads, so a reader rank owning
a head slice reads exactly one contiguous run per (layer, k|v, block) from one holder rank:

    holder rank q heads:  [ h0 h1 h2 h3 ]          (holder TP=1, 4 heads)
    reader rank 0:        [ h0 h1 ]                  reads offset 0, 2 heads
    reader rank 1:                [ h2 h3 ]          reads offset 2 heads, 2 heads
"""

from __future__ import annotations

import numpy as np

from .handle import KVLayout, KVLayoutMismatch, check_compatible

# A run plan is an int64 array of rows (src offset, dst offset, length) in bytes from each tensor's
# base, ordered by (layer, k|v, block index); numpy keeps planning a 2,048-token prompt (8,192 raw
# runs) well under a millisecond.
RunPlan = np.ndarray


def source_rank(holder: KVLayout, reader: KVLayout, reader_rank: int) -> tuple[int, int]:
    """(holder rank, first local head on it) that serves `reader_rank`'s head slice."""
    check_compatible(holder, reader)
    if not 0 <= reader_rank < reader.tp_size:
        raise KVLayoutMismatch(f"reader rank {reader_rank} outside tp_size {reader.tp_size}")
    first_global_head = reader_rank * reader.num_kv_heads_local
    holder_rank, head_offset = divmod(first_global_head, holder.num_kv_heads_local)
    return holder_rank, head_offset


def readers_per_holder_rank(holder: KVLayout, reader_tp_size: int) -> int:
    """How many reader ranks read from each holder rank (the holder releases after all of them)."""
    return reader_tp_size // holder.tp_size


def plan_runs(
    holder: KVLayout,
    holder_num_blocks: int,
    holder_block_ids: list[int],
    reader: KVLayout,
    reader_num_blocks: int,
    reader_rank: int,
    dst_block_ids: list[int],
) -> RunPlan:
    """(src, dst, length) rows for one reader rank: one per (layer, k|v, block), consecutive blocks merged."""
    if len(holder_block_ids) != len(dst_block_ids):
        raise KVLayoutMismatch(
            f"{len(holder_block_ids)} blocks (holder) != {len(dst_block_ids)} destination blocks (reader)"
        )
    _, head_offset = source_rank(holder, reader, reader_rank)
    src_ids = _checked_ids(holder_block_ids, holder_num_blocks, "holder")
    dst_ids = _checked_ids(dst_block_ids, reader_num_blocks, "reader")
    head_bytes = holder.block_size * holder.head_dim * holder.itemsize
    run_len = reader.num_kv_heads_local * head_bytes
    src_block = holder.num_kv_heads_local * head_bytes
    planes = np.arange(holder.num_layers * 2, dtype=np.int64)[:, None]  # (layer, k|v) planes, in order
    if run_len == src_block:
        # The reader takes whole blocks, so consecutive ids on both sides are one run: coalesce the
        # ids once rather than every plane's (a 2,048-token prompt is 1 segment instead of 8,192 runs).
        # Runs never merge across planes: block 0, the null block, is never sent.
        starts = np.flatnonzero((np.diff(src_ids, prepend=-2) != 1) | (np.diff(dst_ids, prepend=-2) != 1))
        lengths = np.diff(np.append(starts, len(src_ids))) * run_len
        src_ids, dst_ids = src_ids[starts], dst_ids[starts]
    else:
        lengths = np.full(len(src_ids), run_len, dtype=np.int64)
    src = planes * (holder_num_blocks * src_block) + head_offset * head_bytes + src_ids[None, :] * src_block
    dst = planes * (reader_num_blocks * run_len) + dst_ids[None, :] * run_len
    return np.stack([src.ravel(), dst.ravel(), np.broadcast_to(lengths, src.shape).ravel()], axis=1)


def _checked_ids(block_ids: list[int], num_blocks: int, side: str) -> np.ndarray:
    ids = np.asarray(block_ids, dtype=np.int64)
    bad = ids[(ids <= 0) | (ids >= num_blocks)]  # block 0 is the engine's null block
    if bad.size:
        raise KVLayoutMismatch(f"{side} block id {int(bad[0])} outside 1..{num_blocks - 1}")
    return ids
