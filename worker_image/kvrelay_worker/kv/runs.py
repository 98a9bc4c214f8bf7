"""Pure byte-run planning: which contiguous bytes of the holder's kv_cache go where in the reader's.

Both sides hold `[num_layers, 2, num_blocks, num_kv_heads_local, block_size, head_dim]`. One
(layer, k|v, block) on a rank is a contiguous span of all its local heads, so a reader rank owning
a head slice reads exactly one contiguous run per (layer, k|v, block) from one holder rank:

    holder rank q heads:  [ h0 h1 h2 h3 ]          (holder TP=1, 4 heads)
    reader rank 0:        [ h0 h1 ]                  reads offset 0, 2 heads
    reader rank 1:                [ h2 h3 ]          reads offset 2 heads, 2 heads
"""

from __future__ import annotations

from typing import NamedTuple

from .handle import KVLayout, KVLayoutMismatch, check_compatible


class Run(NamedTuple):
    """`length` bytes from holder offset `src` to reader offset `dst` (offsets from tensor base)."""

    src: int
    dst: int
    length: int


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
) -> list[Run]:
    """Coalesced runs, ordered by (layer, k|v, block index), for one reader rank."""
    if len(holder_block_ids) != len(dst_block_ids):
        raise KVLayoutMismatch(
            f"{len(holder_block_ids)} blocks (holder) != {len(dst_block_ids)} destination blocks (reader)"
        )
    _, head_offset = source_rank(holder, reader, reader_rank)
    _check_ids(holder_block_ids, holder_num_blocks, "holder")
    _check_ids(dst_block_ids, reader_num_blocks, "reader")
    head_bytes = holder.block_size * holder.head_dim * holder.itemsize
    run_len = reader.num_kv_heads_local * head_bytes
    src_block = holder.num_kv_heads_local * head_bytes
    dst_block = run_len
    runs: list[Run] = []
    for plane in range(holder.num_layers * 2):  # (layer, k|v) planes are contiguous, in this order
        src_plane = plane * holder_num_blocks * src_block + head_offset * head_bytes
        dst_plane = plane * reader_num_blocks * dst_block
        for hb, db in zip(holder_block_ids, dst_block_ids, strict=True):
            src = src_plane + hb * src_block
            dst = dst_plane + db * dst_block
            if runs:
                last = runs[-1]
                if last.src + last.length == src and last.dst + last.length == dst:
                    runs[-1] = Run(last.src, last.dst, last.length + run_len)
                    continue
            runs.append(Run(src, dst, run_len))
    return runs


def _check_ids(block_ids: list[int], num_blocks: int, side: str) -> None:
    for block_id in block_ids:
        if not 0 < block_id < num_blocks:  # block 0 is the engine's null block
            raise KVLayoutMismatch(f"{side} block id {block_id} outside 1..{num_blocks - 1}")
