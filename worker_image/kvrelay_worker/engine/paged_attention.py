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
    """Tensors for one step, from the scheduler's lists (one Python pass, then vectorised)."""
    ctx_lens = [s + q for s, q in zip(start_positions, q_lens, strict=True)]
    max_blocks = -(-max(ctx_lens) // block_size)
    max_q = max(q_lens)
    if max_q == 1:  # pure decode: one new token per sequence, at position ctx - 1
        write_blocks = [t[(c - 1) // block_size] for t, c in zip(block_tables, ctx_lens, strict=True)]
        write_slots = [(c - 1) % block_size for c in ctx_lens]
    else:
        write_blocks, write_slots = [], []
        for q_len, start, table in zip(q_lens, start_positions, block_tables, strict=True):
            for pos in range(start, start + q_len):
                write_blocks.append(table[pos // block_size])
                write_slots.append(pos % block_size)
    rows = block_tables  # the scheduler allocates exactly ceil(ctx / block_size) blocks per sequence
    if any(len(t) != max_blocks for t in block_tables):
        rows = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in block_tables]
    table = torch.from_numpy(np.array(rows, dtype=np.int64))  # ~10x faster than torch.tensor(rows)
    num_keys = max(ctx_lens)  # no padding key at all when every context has the same length
    mask = None
    if max_q == 1:
        if any(c != num_keys for c in ctx_lens):
            mask = torch.arange(num_keys).view(1, 1, 1, -1) < torch.tensor(ctx_lens).view(-1, 1, 1, 1)
    else:
        ctx = torch.tensor(ctx_lens).view(-1, 1, 1, 1)
        ql = torch.tensor(q_lens).view(-1, 1, 1, 1)
        qi = torch.arange(max_q).view(1, 1, -1, 1)
        key = torch.arange(num_keys).view(1, 1, 1, -1)
        mask = key <= ctx - ql + qi
    scatter_b = scatter_q = None
    if any(q != max_q for q in q_lens):
        scatter_b = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens)).to(device)
        scatter_q = torch.cat([torch.arange(q) for q in q_lens]).to(device)
    # (block b, head h) is one contiguous run in [NB*H, bs, D]: row b*H + h. Gathering rows in
    # [B, H, MB] order yields [B, H, MB*bs, D] directly, with a single copy.
    heads = torch.arange(num_kv_heads).view(1, -1, 1)
    gather_idx = (table.unsqueeze(1) * num_kv_heads + heads).reshape(-1)
    on = (lambda t: t) if device.type == "cpu" else (lambda t: t.to(device, non_blocking=True))
    return PagedBatch(
        write_blocks=on(torch.from_numpy(np.array(write_blocks, dtype=np.int64))),
        write_slots=on(torch.from_numpy(np.array(write_slots, dtype=np.int64))),
        block_table=on(table),
        q_lens=q_lens,
        mask=None if mask is None else on(mask),
        scatter_b=scatter_b,
        scatter_q=scatter_q,
        fresh_single=len(q_lens) == 1 and start_positions[0] == 0,
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
