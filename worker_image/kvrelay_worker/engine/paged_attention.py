"""The paged KV cache tensor and the attention backend that reads and writes it.

Layout (wire contract section 1), one tensor per worker:

    kv_cache[layer, 0=K|1=V, block, kv_head, slot, head_dim]

Token t of a sequence lives in block ``table[t // block_size]`` at slot ``t % block_size``.
Per step we gather each sequence's blocks into a padded [B, H, blocks*block_size, D] view and run
SDPA with a mask that hides padding and future tokens:

    keys:     0 1 2 3 | 4 5 6 7 | 8 9 . .     (ctx_len 10, block_size 4)
    query i (of q_len 3, ctx 10) may see keys <= 10 - 3 + i
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvrelay_worker.model.config import LlamaConfig


def allocate_kv_cache(
    config: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """One contiguous tensor for the whole cache (registered once with the KV transport)."""
    shape = (config.num_hidden_layers, 2, num_blocks, config.num_key_value_heads, block_size, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class PagedBatch:
    """Per-step metadata shared by all layers."""

    write_blocks: torch.Tensor  # [N] block id of each new token
    write_slots: torch.Tensor  # [N] slot in block of each new token
    block_table: torch.Tensor  # [B, max_blocks] (padded with the null block)
    q_lens: list[int]
    mask: torch.Tensor | None  # [B, 1, max_q, max_blocks*block_size] bool; None when no key is hidden
    scatter_b: torch.Tensor | None  # [N] row in the padded query batch (None when all q_lens equal)
    scatter_q: torch.Tensor | None  # [N] position in that row
    fresh_single: bool  # one sequence starting at position 0: attend over k/v directly
    num_keys: int  # keys per row after the gather: the longest context in the batch
    gather_idx: torch.Tensor  # [B*H*MB] rows of the (block, head)-flattened cache, in [B, H, MB] order


def build_paged_batch(
    q_lens: list[int],
    start_positions: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_kv_heads: int,
    device: torch.device,
) -> PagedBatch:
    """Tensors for one step, from the scheduler's lists.

    Index arithmetic runs in numpy (a small numpy op costs ~1 us, a torch op ~5 us); each result
    becomes a tensor with one zero-copy ``from_numpy``.
    """
    batch = len(q_lens)
    ctx = np.array(start_positions, dtype=np.int64) + np.array(q_lens, dtype=np.int64)
    num_keys = int(ctx.max())  # no padding key at all when every context has the same length
    max_blocks = -(-num_keys // block_size)
    max_q = max(q_lens)
    rows = block_tables  # the scheduler allocates exactly ceil(ctx / block_size) blocks per sequence
    if any(len(t) != max_blocks for t in block_tables):
        rows = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in block_tables]
    table = np.array(rows, dtype=np.int64)  # [B, MB]
    if max_q == 1:  # pure decode: one new token per sequence, at position ctx - 1
        pos = ctx - 1
        write_blocks = table[np.arange(batch), pos // block_size]
    else:
        seq = np.repeat(np.arange(batch), q_lens)
        pos = np.concatenate([np.arange(s, s + q) for s, q in zip(start_positions, q_lens, strict=True)])
        write_blocks = table[seq, pos // block_size]
    write_slots = pos % block_size
    mask = None
    if max_q == 1:
        if (ctx != num_keys).any():
            mask = (np.arange(num_keys)[None, :] < ctx[:, None]).reshape(batch, 1, 1, num_keys)
    else:
        qi = np.arange(max_q).reshape(1, -1, 1)
        key = np.arange(num_keys).reshape(1, 1, -1)
        bound = (ctx - np.array(q_lens, dtype=np.int64)).reshape(-1, 1, 1)
        mask = (key <= bound + qi).reshape(batch, 1, max_q, num_keys)
    scatter_b = scatter_q = None
    if any(q != max_q for q in q_lens):
        scatter_b = np.repeat(np.arange(batch), q_lens)
        scatter_q = np.concatenate([np.arange(q) for q in q_lens])
    # (block b, head h) is one contiguous run in [NB*H, bs, D]: row b*H + h. Gathering rows in
    # [B, H, MB] order yields [B, H, MB*bs, D] directly, with a single copy.
    gather_idx = (table[:, None, :] * num_kv_heads + np.arange(num_kv_heads)[None, :, None]).reshape(-1)

    def on(a: np.ndarray | None) -> torch.Tensor | None:
        if a is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if device.type == "cpu" else t.to(device, non_blocking=True)

    return PagedBatch(
        write_blocks=on(write_blocks),
        write_slots=on(write_slots),
        block_table=on(table),
        q_lens=q_lens,
        mask=on(mask),
        scatter_b=on(scatter_b),
        scatter_q=on(scatter_q),
        fresh_single=batch == 1 and start_positions[0] == 0,
        num_keys=num_keys,
        gather_idx=on(gather_idx),
    )


class PagedAttention:
    """Attention backend over the paged cache for one step (SDPA over gathered blocks)."""

    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch) -> None:
        self.kv_cache = kv_cache
        self.batch = batch

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bt = self.batch
        layer = self.kv_cache[layer_idx]  # [2, NB, H, bs, D]; K and V move together: half the ops
        layer[:, bt.write_blocks, :, bt.write_slots] = torch.stack((k, v), dim=1)
        if bt.fresh_single:  # a whole prompt with no earlier context: plain causal attention
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                is_causal=True,
                enable_gqa=True,
            )
            return out.squeeze(0).transpose(0, 1)
        b = bt.block_table.shape[0]
        keys, values = _gather(layer, bt.gather_idx, b, bt.num_keys)
        if bt.scatter_b is None:
            qb = q.view(b, -1, *q.shape[1:]).transpose(1, 2)
        else:
            padded = q.new_zeros(b, max(bt.q_lens), *q.shape[1:])
            padded[bt.scatter_b, bt.scatter_q] = q
            qb = padded.transpose(1, 2)
        out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=bt.mask, enable_gqa=True)
        out = out.transpose(1, 2)  # [B, max_q, Hq, D]
        if bt.scatter_b is None:
            return out.reshape(q.shape)
        return out[bt.scatter_b, bt.scatter_q]


def _gather(
    layer: torch.Tensor, gather_idx: torch.Tensor, batch: int, num_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, NB, H, bs, D] -> K and V, each [B, H, num_keys, D], with one index_select copy."""
    _, nb, h, bs, d = layer.shape
    kv = layer.view(2, nb * h, bs, d).index_select(1, gather_idx).view(2, batch, h, -1, d)
    return kv[0, :, :, :num_keys], kv[1, :, :, :num_keys]
