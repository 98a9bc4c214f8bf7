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


def build_paged_batch(
    q_lens: list[int], start_positions: list[int], block_tables: list[list[int]], block_size: int, device
) -> PagedBatch:
    """Tensors for one step, from the scheduler's lists (one Python pass, then vectorised)."""
    write_blocks: list[int] = []
    write_slots: list[int] = []
    for q_len, start, table in zip(q_lens, start_positions, block_tables, strict=True):
        for pos in range(start, start + q_len):
            write_blocks.append(table[pos // block_size])
            write_slots.append(pos % block_size)
    ctx_lens = [s + q for s, q in zip(start_positions, q_lens, strict=True)]
    max_blocks = max(-(-c // block_size) for c in ctx_lens)
    table = torch.zeros(len(q_lens), max_blocks, dtype=torch.long)
    for b, t in enumerate(block_tables):
        n = min(len(t), max_blocks)
        table[b, :n] = torch.tensor(t[:n], dtype=torch.long)
    max_q = max(q_lens)
    equal_q = all(q == max_q for q in q_lens)
    num_keys = max_blocks * block_size
    mask = None
    if not (max_q == 1 and all(c == num_keys for c in ctx_lens)):
        ctx = torch.tensor(ctx_lens).view(-1, 1, 1, 1)
        ql = torch.tensor(q_lens).view(-1, 1, 1, 1)
        qi = torch.arange(max_q).view(1, 1, -1, 1)
        key = torch.arange(num_keys).view(1, 1, 1, -1)
        mask = (key <= ctx - ql + qi).to(device)
    scatter_b = scatter_q = None
    if not equal_q:
        scatter_b = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens)).to(device)
        scatter_q = torch.cat([torch.arange(q) for q in q_lens]).to(device)
    return PagedBatch(
        write_blocks=torch.tensor(write_blocks, dtype=torch.long, device=device),
        write_slots=torch.tensor(write_slots, dtype=torch.long, device=device),
        block_table=table.to(device),
        q_lens=q_lens,
        mask=mask,
        scatter_b=scatter_b,
        scatter_q=scatter_q,
        fresh_single=len(q_lens) == 1 and start_positions[0] == 0,
    )


class PagedAttention:
    """Attention backend over the paged cache for one step (SDPA over gathered blocks)."""

    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch) -> None:
        self.kv_cache = kv_cache
        self.batch = batch

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bt = self.batch
        k_cache, v_cache = self.kv_cache[layer_idx, 0], self.kv_cache[layer_idx, 1]  # [NB, H, bs, D]
        k_cache[bt.write_blocks, :, bt.write_slots] = k
        v_cache[bt.write_blocks, :, bt.write_slots] = v
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
        keys = _gather(k_cache, bt.block_table)
        values = _gather(v_cache, bt.block_table)
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


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[NB, H, bs, D] indexed by [B, MB] -> [B, H, MB*bs, D]."""
    g = cache[table]  # [B, MB, H, bs, D]
    b, mb, h, bs, d = g.shape
    return g.permute(0, 2, 1, 3, 4).reshape(b, h, mb * bs, d)
