"""The paged KV cache tensor and the attention backend that reads and writes it.

Layout (wire contract section 1), one tensor per worker:

    kv_cache[layer, 0=K|1=V, block, kv_head, slot, head_dim]

Token t of a sequence lives in block ``table[t // block_size]`` at slot ``t % block_size``.
Per step the batch's sequences split into attention groups, one SDPA call each, so that no row
pays for another row's query length:

- decode rows (query length 1) form one group: their blocks are gathered into a
  [B, H, blocks*block_size, D] view padded to the longest decode context, with a mask for
  the padding keys when the contexts differ;
- prefill rows (query length > 1) are grouped only with rows of (nearly) the same shape, so a
  group's padded query x key area stays within ``_PAD_RATIO`` of its rows' own areas (a
  2,040-token prompt chunk runs alone; equal prompts admitted together run as one group).
  A group of fresh prompts of equal length (all starting at position 0) attends over the step's
  own k/v with ``is_causal``; any other group gathers its blocks and masks future tokens:

    keys:     0 1 2 3 | 4 5 6 7 | 8 9 . .     (ctx_len 10, block_size 4)
    query i (of q_len 3, ctx 10) may see keys <= 10 - 3 + i
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvrelay_worker.model.config import LlamaConfig

# A prefill row joins a group while the group's padded area (rows * max_q * max_keys) stays within
# this factor of the sum of its rows' own areas (q_len * ctx_len), or within _PAD_SLACK elements of
# it (tiny chunks: one SDPA call costs more than a little padding).
_PAD_RATIO = 1.25
_PAD_SLACK = 64 * 64
# Memory the dense decode mirror (all layers) may take; a larger decode batch attends by gathering.
MIRROR_MAX_BYTES = 256 << 20


def allocate_kv_cache(
    config: LlamaConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    num_kv_heads: int | None = None,
) -> torch.Tensor:
    """One contiguous tensor for the whole cache (registered once with the KV transport); a TP rank
    holds ``num_kv_heads`` of the model's KV heads."""
    heads = num_kv_heads or config.num_key_value_heads
    shape = (config.num_hidden_layers, 2, num_blocks, heads, block_size, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class AttnGroup:
    """Sequences attended together in one SDPA call."""

    tokens: slice | torch.Tensor  # the group's tokens in the flat batch, row by row (a slice if contiguous)
    rows: int
    q_len: int  # query positions per row: the longest query in the group
    num_keys: int  # keys per row after the gather: the longest context in the group
    fresh: bool  # equal-length prompts starting at position 0: causal attention over the step's k/v
    gather_idx: torch.Tensor | None  # [rows*H*MB] cache rows to gather (see _gather_rows); None if fresh
    mask: torch.Tensor | None  # [rows, 1, q_len, num_keys] bool; None when no key is hidden
    scatter_b: torch.Tensor | None  # [n] row of each token in the padded query batch (None: equal q_lens)
    scatter_q: torch.Tensor | None  # [n] position in that row


class DecodeMirror:
    """Dense per-layer copies [2, B, H, capacity, D] of a steady decode batch's K/V.

    Built by one gather per layer on the step the batch forms; each later step of the same batch only
    writes its new token's K/V into it (as well as into the paged cache, which stays the source of
    truth), so attention reads a contiguous cache instead of gathering every context again.
    """

    def __init__(self, batch: int, num_kv_heads: int, capacity: int, rows: torch.Tensor) -> None:
        self.batch = batch
        self.num_kv_heads = num_kv_heads
        self.capacity = capacity
        self.rows = rows  # [B*H] row of each (sequence, kv head)'s new token in [2, B*H*capacity, D]
        self.layers: dict[int, torch.Tensor] = {}
        self.disabled = False  # too large for the memory limit: attend by gathering instead

    def attend_kv(
        self,
        layer_idx: int,
        num_layers: int,
        blocks: torch.Tensor,
        g: AttnGroup,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K and V [B, H, num_keys, D] of the layer (its new tokens written), or None to gather."""
        m = self.layers.get(layer_idx)
        if m is None:
            d = blocks.shape[3]
            size = num_layers * 2 * self.batch * self.num_kv_heads * self.capacity * d * blocks.element_size()
            if self.disabled or size > MIRROR_MAX_BYTES:
                self.disabled = True
                return None
            keys, values = _gather(blocks, g.gather_idx, g.rows, self.num_kv_heads, g.num_keys)
            m = blocks.new_zeros(2, self.batch, self.num_kv_heads, self.capacity, d)
            m[0, :, :, : g.num_keys] = keys
            m[1, :, :, : g.num_keys] = values
            self.layers[layer_idx] = m
        else:
            flat = m.view(2, -1, m.shape[-1])
            flat.index_copy_(1, self.rows, torch.stack((k, v)).view(2, -1, k.shape[-1]))
        kv = m.narrow(3, 0, g.num_keys)
        return kv[0], kv[1]


@dataclass
class PagedBatch:
    """Per-step metadata shared by all layers."""

    write_idx: torch.Tensor  # [N*H] row of each (new token, kv head) in a layer's [2, NB*H*bs, D] view
    q_lens: list[int]
    groups: list[AttnGroup]
    whole: bool  # a single group covering all N tokens in order: its output is the layer's output
    mirror: DecodeMirror | None = None  # decode-only steps of a steady batch: dense K/V copies


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
    q_arr = np.array(q_lens, dtype=np.int64)
    start = np.array(start_positions, dtype=np.int64)
    ctx = start + q_arr
    max_blocks = -(-int(ctx.max()) // block_size)
    max_q = max(q_lens)
    rows = block_tables  # the scheduler allocates exactly ceil(ctx / block_size) blocks per sequence
    if any(len(t) != max_blocks for t in block_tables):
        rows = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in block_tables]
    table = np.array(rows, dtype=np.int64)  # [B, MB], padded with the null block
    if max_q == 1:  # pure decode: one new token per sequence, at position ctx - 1
        pos = ctx - 1
        write_blocks = table[np.arange(batch), pos // block_size]
    else:
        seq = np.repeat(np.arange(batch), q_lens)
        pos = np.concatenate([np.arange(s, s + q) for s, q in zip(start_positions, q_lens, strict=True)])
        write_blocks = table[seq, pos // block_size]
    write_idx = _write_rows(write_blocks, pos % block_size, num_kv_heads, block_size)

    def on(a: np.ndarray | None) -> torch.Tensor | None:
        if a is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if device.type == "cpu" else t.to(device, non_blocking=True)

    if max_q == 1:  # pure decode: one group, every row padded only to the longest context
        num_keys = int(ctx.max())
        mask = None
        if (ctx != num_keys).any():
            mask = on((np.arange(num_keys)[None, :] < ctx[:, None]).reshape(batch, 1, 1, num_keys))
        gather = on(_gather_rows(table, num_kv_heads))
        only = AttnGroup(slice(0, batch), batch, 1, num_keys, False, gather, mask, None, None)
        return PagedBatch(on(write_idx), q_lens, [only], whole=True)

    offsets = np.zeros(batch + 1, dtype=np.int64)
    np.cumsum(q_arr, out=offsets[1:])

    def group(members: list[int]) -> AttnGroup:
        """One SDPA call's metadata for the rows ``members`` (ascending batch indices)."""
        idx = np.array(members, dtype=np.int64)
        n = len(members)
        rq, rc, rs = q_arr[idx], ctx[idx], start[idx]
        gq, gk = int(rq.max()), int(rc.max())
        if members[-1] - members[0] == n - 1:  # consecutive rows: consecutive tokens
            tokens: slice | torch.Tensor = slice(int(offsets[members[0]]), int(offsets[members[-1] + 1]))
        else:
            tokens = on(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members]))
        uniform_q = bool((rq == gq).all())
        if gq > 1 and uniform_q and not rs.any():
            return AttnGroup(tokens, n, gq, gk, True, None, None, None, None)
        gather = _gather_rows(table[idx, : -(-gk // block_size)], num_kv_heads)
        mask = None
        if gq == 1:
            if (rc != gk).any():
                mask = (np.arange(gk)[None, :] < rc[:, None]).reshape(n, 1, 1, gk)
        else:
            qi = np.arange(gq).reshape(1, -1, 1)
            key = np.arange(gk).reshape(1, 1, -1)
            mask = (key <= (rc - rq).reshape(-1, 1, 1) + qi).reshape(n, 1, gq, gk)
        scatter_b = scatter_q = None
        if not uniform_q:
            scatter_b = np.repeat(np.arange(n), rq)
            scatter_q = np.concatenate([np.arange(q) for q in rq])
        return AttnGroup(tokens, n, gq, gk, False, on(gather), on(mask), on(scatter_b), on(scatter_q))

    groups = []
    decodes = [i for i, q in enumerate(q_lens) if q == 1]
    if decodes:
        groups.append(group(decodes))
    # Largest query first, then largest context: rows of the same shape end up adjacent.
    prefills = sorted((i for i, q in enumerate(q_lens) if q > 1), key=lambda i: (-q_lens[i], -int(ctx[i]), i))
    members: list[int] = []
    gq = gk = area = 0
    for i in prefills:
        qi, ci = q_lens[i], int(ctx[i])
        if members:
            padded = (len(members) + 1) * gq * max(gk, ci)
            own = area + qi * ci
            if padded <= _PAD_RATIO * own or padded - own <= _PAD_SLACK:
                members.append(i)
                gk, area = max(gk, ci), own
                continue
            groups.append(group(sorted(members)))
        members, gq, gk, area = [i], qi, ci, qi * ci
    groups.append(group(sorted(members)))
    whole = len(groups) == 1 and isinstance(groups[0].tokens, slice)
    return PagedBatch(
        write_idx=on(write_idx),
        q_lens=q_lens,
        groups=groups,
        whole=whole,
    )


class DecodeBatchBuilder:
    """``build_paged_batch`` for decode-only steps (one new token per sequence), incremental.

    Consecutive decode steps usually run the same sequences, each one token further:

    - the padded block table and the gather index are kept while every sequence's block table is
      the same list object with the same length (the scheduler only appends to a request's table,
      and gives a request a new list when it frees its blocks); only rows whose table grew are
      refreshed;
    - while no sequence crosses into a new block, the positions and the cache rows written advance
      by one: two in-place adds on the last step's tensors instead of rebuilding them.

    Anything else (new or departed sequences, a new block, positions that did not advance by one)
    recomputes the step's tensors from the lists, in numpy.

    Each batch also carries a ``DecodeMirror``: dense per-layer K/V of the batch, gathered once when the
    batch forms and then appended to, while the same sequences advance one token per step and fit its
    capacity; otherwise (or after ``reset``) the step gets a fresh mirror, built by the full gather.
    """

    def __init__(self, block_size: int, num_kv_heads: int, device: torch.device) -> None:
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.same_batch = False  # the last build ran the same sequences as the build before it
        self._tables: list[list[int]] = []  # the block table objects of the cached batch
        self._counts: list[int] = []
        self._table = np.zeros((0, 0), dtype=np.int64)  # [B, capacity], padded with the null block
        self._gather: torch.Tensor | None = None
        self._gather_blocks = 0  # block columns the cached gather index covers
        self._heads = np.arange(0, num_kv_heads * block_size, block_size)[None, :]
        # the last step's tensors, advanced in place while every sequence stays in its block
        self._expect: list[int] = []  # positions the next step must have to advance in place
        self._advances = 0  # steps every sequence can still advance without leaving its block
        self._pos: torch.Tensor | None = None
        self._write: torch.Tensor | None = None
        self._num_keys = 0
        self._masked = False  # contexts differ: a padding mask is needed
        self._keys: torch.Tensor | None = None  # arange of key positions, for the mask
        self._mirror: DecodeMirror | None = None  # dense K/V copies of the cached batch

    def reset(self) -> None:
        """Forget the cached batch (after any step that was not decode-only)."""
        self._tables, self._counts, self._gather, self._expect = [], [], None, []
        self._mirror = None

    def _on(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def build(self, positions: list[int], block_tables: list[list[int]]) -> tuple[PagedBatch, torch.Tensor]:
        """PagedBatch and positions tensor [B] for tokens at ``positions`` (ctx = position + 1)."""
        batch = len(block_tables)
        counts = list(map(len, block_tables))
        tables = self._tables
        self.same_batch = len(tables) == batch and all(map(operator.is_, block_tables, tables))
        # every sequence is one token further than last step: a mirror of the batch stays valid
        advanced = self.same_batch and positions == self._expect
        mirror = self._mirror
        if advanced and counts == self._counts and self._advances > 0:
            self._advances -= 1
            self._expect = [p + 1 for p in positions]
            self._num_keys += 1
            pos, write = self._pos.add_(1), self._write.add_(1)
            if mirror is not None and self._num_keys <= mirror.capacity:
                mirror.rows.add_(1)
            else:
                mirror = None
        else:
            pos, write = self._rebuild(positions, block_tables, counts)
            if not (advanced and mirror is not None and self._num_keys <= mirror.capacity):
                mirror = None
            elif not mirror.disabled:
                mirror.rows = self._on(self._mirror_rows(positions, mirror.capacity))
        num_keys = self._num_keys
        if mirror is None:  # (re)build on this step's gather, with room to grow
            capacity = num_keys + max(64, num_keys // 2)
            mirror = DecodeMirror(
                batch, self.num_kv_heads, capacity, self._on(self._mirror_rows(positions, capacity))
            )
        self._mirror = mirror
        mask = None
        if self._masked:  # hide each row's keys past its own context
            mask = (self._keys[:num_keys] <= pos[:, None]).view(batch, 1, 1, num_keys)
        group = AttnGroup(slice(0, batch), batch, 1, num_keys, False, self._gather, mask, None, None)
        return PagedBatch(write, [1] * batch, [group], whole=True, mirror=mirror), pos

    def _mirror_rows(self, positions: list[int], capacity: int) -> np.ndarray:
        """Rows of the new tokens in a mirror's [2, B*H*capacity, D] view, in [B, H] order."""
        batch, h = len(positions), self.num_kv_heads
        seq_head = np.arange(batch * h, dtype=np.int64).reshape(batch, h) * capacity
        return (seq_head + np.array(positions, dtype=np.int64)[:, None]).reshape(-1)

    def _rebuild(
        self, positions: list[int], block_tables: list[list[int]], counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, bs = len(block_tables), self.block_size
        if not self.same_batch:
            table = np.zeros((batch, max(counts)), dtype=np.int64)
            for i, t in enumerate(block_tables):
                table[i, : len(t)] = t
            self._table, self._tables, self._counts, self._gather = table, list(block_tables), counts, None
        elif counts != self._counts:  # some sequences took a new block: refresh their rows only
            table = self._table
            if max(counts) > table.shape[1]:
                grown = np.zeros((batch, max(counts) + 4), dtype=np.int64)
                grown[:, : table.shape[1]] = table
                self._table = table = grown
            for i, (c, old) in enumerate(zip(counts, self._counts, strict=True)):
                if c != old:
                    table[i, :c] = block_tables[i]
                    table[i, c:] = 0
            self._counts, self._gather = counts, None
        table = self._table
        pos = np.array(positions, dtype=np.int64)
        last, first = max(positions), min(positions)
        nblk = last // bs + 1
        if self._gather is None or nblk != self._gather_blocks:
            self._gather = self._on(_gather_rows(table[:, :nblk], self.num_kv_heads))
            self._gather_blocks = nblk
        slots = pos % bs
        base = table[np.arange(batch), pos // bs] * (self.num_kv_heads * bs) + slots
        self._write = self._on((base[:, None] + self._heads).reshape(-1))
        self._pos = self._on(pos)
        self._num_keys = last + 1
        self._advances = bs - 1 - int(slots.max())
        self._expect = [p + 1 for p in positions]
        self._masked = first != last
        if self._masked and (self._keys is None or self._keys.shape[0] < last + 1 + bs):
            self._keys = torch.arange(2 * (last + 1 + bs), device=self.device)
        return self._pos, self._write


LayerViews = list[tuple[torch.Tensor, torch.Tensor]]


def layer_views(kv_cache: torch.Tensor) -> LayerViews:
    """Per layer, two views of its [2, NB, H, bs, D] cache: [2, NB*H*bs, D] (one row per token and
    head, for writes) and [2, NB*H, bs, D] (one row per block and head, for gathers). Build once."""
    num_layers, _, nb, h, bs, d = kv_cache.shape
    return [
        (kv_cache[i].view(2, nb * h * bs, d), kv_cache[i].view(2, nb * h, bs, d)) for i in range(num_layers)
    ]


class PagedAttention:
    """Attention backend over the paged cache for one step (one SDPA per attention group)."""

    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch, views: LayerViews | None = None) -> None:
        self.kv_cache = kv_cache
        self.batch = batch
        self.views = views if views is not None else layer_views(kv_cache)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bt = self.batch
        tokens, blocks = self.views[layer_idx]
        # K and V move together: one copy of [2, N*H, D] rows into the layer's cache
        tokens.index_copy_(1, bt.write_idx, torch.stack((k, v)).view(2, -1, k.shape[-1]))
        if bt.mirror is not None:
            g = bt.groups[0]
            kv = bt.mirror.attend_kv(layer_idx, len(self.views), blocks, g, k, v)
            if kv is not None:
                out = F.scaled_dot_product_attention(
                    q.view(g.rows, 1, *q.shape[1:]).transpose(1, 2), *kv, attn_mask=g.mask, enable_gqa=True
                )
                return out.transpose(1, 2).reshape(q.shape)
        if bt.whole:
            return _attend(bt.groups[0], blocks, q, k, v)
        out = torch.empty_like(q)
        for g in bt.groups:
            res = _attend(g, blocks, q, k, v)
            if isinstance(g.tokens, slice):
                out[g.tokens] = res
            else:
                out.index_copy_(0, g.tokens, res)
        return out


def _attend(
    g: AttnGroup, blocks: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Attention output [n, Hq, D] for the group's n tokens (``blocks``: the layer's cache as
    [2, NB*H, bs, D], already holding their k/v)."""
    qg = _take(q, g.tokens)
    if g.fresh:  # whole prompts with no earlier context: plain causal attention over their own k/v
        kg, vg = _take(k, g.tokens), _take(v, g.tokens)
        out = F.scaled_dot_product_attention(
            qg.reshape(g.rows, g.q_len, *q.shape[1:]).transpose(1, 2),
            kg.reshape(g.rows, g.q_len, *k.shape[1:]).transpose(1, 2),
            vg.reshape(g.rows, g.q_len, *v.shape[1:]).transpose(1, 2),
            is_causal=True,
            enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(qg.shape)
    keys, values = _gather(blocks, g.gather_idx, g.rows, k.shape[1], g.num_keys)
    if g.scatter_b is None:
        qb = qg.reshape(g.rows, g.q_len, *q.shape[1:]).transpose(1, 2)
    else:
        padded = qg.new_zeros(g.rows, g.q_len, *q.shape[1:])
        padded[g.scatter_b, g.scatter_q] = qg
        qb = padded.transpose(1, 2)
    out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=g.mask, enable_gqa=True)
    out = out.transpose(1, 2)  # [rows, q_len, Hq, D]
    if g.scatter_b is None:
        return out.reshape(qg.shape)
    return out[g.scatter_b, g.scatter_q]


def _gather_rows(table: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Cache rows to gather for block table ``table`` [B, MB], in [B, H, MB] order.

    (block b, head h) is one contiguous run in [NB*H, bs, D]: row b*H + h. Gathering rows in
    [B, H, MB] order yields [B, H, MB*bs, D] directly, with a single copy.
    """
    return (table[:, None, :] * num_kv_heads + np.arange(num_kv_heads)[None, :, None]).reshape(-1)


def _write_rows(blocks: np.ndarray, slots: np.ndarray, num_kv_heads: int, block_size: int) -> np.ndarray:
    """Rows of the new tokens' (token, head) pairs in [NB*H*bs, D], in [N, H] order (as k.view(N*H, D))."""
    base = blocks * (num_kv_heads * block_size) + slots
    return (base[:, None] + np.arange(0, num_kv_heads * block_size, block_size)[None, :]).reshape(-1)


def _take(x: torch.Tensor, tokens: slice | torch.Tensor) -> torch.Tensor:
    return x[tokens] if isinstance(tokens, slice) else x.index_select(0, tokens)


def _gather(
    blocks: torch.Tensor, gather_idx: torch.Tensor, batch: int, num_kv_heads: int, num_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, NB*H, bs, D] -> K and V, each [B, H, num_keys, D], with one index_select copy."""
    kv = blocks.index_select(1, gather_idx).view(2, batch, num_kv_heads, -1, blocks.shape[3])
    if kv.shape[3] != num_keys:
        kv = kv.narrow(3, 0, num_keys)
    return kv.unbind(0)
