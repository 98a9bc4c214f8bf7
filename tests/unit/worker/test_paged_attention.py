"""PagedAttention over mixed batches == per-sequence dense attention; no row is padded to another's shape."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from kvrelay_worker.engine import paged_attention
from kvrelay_worker.engine.paged_attention import DecodeBatchBuilder, PagedAttention, build_paged_batch

HQ, HKV, D, BS, NB = 4, 2, 8, 4, 512


def _run(seqs: list[tuple[int, int]], seed: int) -> None:
    """seqs: (start, q_len) per sequence, in batch order. Checks every token's attention output."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    free = list(range(1, NB))
    rng.shuffle(free)
    cache = torch.zeros(1, 2, NB, HKV, BS, D)
    tables, past = [], []
    for start, q in seqs:
        table = [free.pop() for _ in range(-(-(start + q) // BS))]
        tables.append(table)
        kv = torch.randn(2, start, HKV, D, generator=gen)  # keys/values of the earlier tokens
        for t in range(start):
            cache[0, :, table[t // BS], :, t % BS] = kv[:, t]
        past.append(kv)
    n = sum(q for _, q in seqs)
    q, k, v = (
        torch.randn(n, HQ, D, generator=gen),
        torch.randn(n, HKV, D, generator=gen),
        torch.randn(n, HKV, D, generator=gen),
    )
    batch = build_paged_batch(
        [q for _, q in seqs], [s for s, _ in seqs], tables, BS, HKV, torch.device("cpu")
    )
    out = PagedAttention(cache, batch)(0, q, k, v)
    off = 0
    for (start, ql), kv in zip(seqs, past, strict=True):
        keys = torch.cat((kv[0], k[off : off + ql])).transpose(0, 1)  # [HKV, ctx, D]
        values = torch.cat((kv[1], v[off : off + ql])).transpose(0, 1)
        mask = torch.ones(ql, start + ql, dtype=torch.bool).tril(diagonal=start)
        ref = F.scaled_dot_product_attention(
            q[off : off + ql].transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(out[off : off + ql], ref, rtol=1e-5, atol=1e-5)
        off += ql


@pytest.mark.parametrize(
    "seqs",
    [
        [(7, 1), (0, 1), (30, 1)],  # pure decode, different contexts
        [(0, 9), (0, 9), (0, 9)],  # equal fresh prompts: one causal group
        [(0, 9), (5, 1), (0, 9), (12, 1)],  # equal fresh prompts and decodes interleaved
        [(20, 1), (0, 200), (33, 1), (16, 8), (0, 3), (40, 1), (0, 5)],  # long chunk, decodes, small prefills
        [(0, 12), (0, 11), (3, 10), (1, 2)],  # similar prefills grouped with query padding
    ],
)
def test_mixed_batches_match_dense_attention(seqs: list[tuple[int, int]]) -> None:
    _run(seqs, seed=len(seqs))


def test_random_mixed_batches_match_dense_attention() -> None:
    rng = random.Random(7)
    for seed in range(30):
        seqs = []
        for _ in range(rng.randint(1, 10)):
            kind = rng.random()
            if kind < 0.5:
                seqs.append((rng.randint(0, 60), 1))
            elif kind < 0.8:
                seqs.append((0, rng.randint(2, 40)))
            else:
                seqs.append((rng.randint(1, 60), rng.randint(2, 40)))
        _run(seqs, seed)


def test_decodes_are_not_padded_to_a_long_prefill() -> None:
    q_lens = [1] * 16 + [2040]
    starts = [32] * 16 + [0]
    tables = [list(range(1 + 3 * i, 4 + 3 * i)) for i in range(16)] + [list(range(100, 100 + 2040 // 16 + 1))]
    batch = build_paged_batch(q_lens, starts, tables, 16, HKV, torch.device("cpu"))
    shapes = sorted((g.rows, g.q_len, g.num_keys) for g in batch.groups)
    assert shapes == [(1, 2040, 2040), (16, 1, 33)]


def _churn(rng: random.Random, seqs: list[list], free: list[int]) -> None:
    """One step of a running batch: sequences ([position, block table]) join, leave, get preempted
    (a new table), and every table grows to cover its next token, as the scheduler's _grow does."""
    if rng.random() < 0.05 or not seqs:  # a sequence joins
        seqs.insert(rng.randint(0, len(seqs)), [rng.randint(0, 40), []])
    if len(seqs) > 1 and rng.random() < 0.04:  # one leaves
        free.extend(seqs.pop(rng.randrange(len(seqs)))[1])
    if rng.random() < 0.02:  # one is preempted and comes back with a new table
        s = seqs[rng.randrange(len(seqs))]
        free.extend(s[1])
        s[1] = []
    for s in seqs:  # a table covers ctx = position + 1 tokens
        while len(s[1]) * BS < s[0] + 1:
            s[1].append(free.pop(0))


def test_incremental_decode_builder_matches_full_build() -> None:
    """DecodeBatchBuilder (cached tables, in-place advance) == build_paged_batch, step after step,
    while sequences join, leave, cross into new blocks and get new tables."""
    rng = random.Random(11)
    builder = DecodeBatchBuilder(BS, HKV, torch.device("cpu"))
    free = list(range(1, NB))
    rng.shuffle(free)
    seqs: list[list] = []  # [position, block table]
    for step in range(400):
        _churn(rng, seqs, free)
        if step % 50 == 49:
            builder.reset()
        positions = [s[0] for s in seqs]
        tables = [s[1] for s in seqs]
        got, pos = builder.build(positions, tables)
        want = build_paged_batch([1] * len(seqs), positions, tables, BS, HKV, torch.device("cpu"))
        assert pos.tolist() == positions
        assert torch.equal(got.write_idx, want.write_idx), step
        (g,), (w,) = got.groups, want.groups
        assert (g.rows, g.q_len, g.num_keys) == (w.rows, w.q_len, w.num_keys)
        gather = g.gather_idx.view(len(seqs), HKV, -1)
        assert torch.equal(gather, w.gather_idx.view(len(seqs), HKV, -1)[:, :, : gather.shape[2]])
        assert (g.mask is None) == (w.mask is None)
        if g.mask is not None:
            assert torch.equal(g.mask, w.mask)
        for s in seqs:
            s[0] += 1


@pytest.mark.parametrize("max_bytes", [None, 0])
def test_decode_mirror_matches_gather_path(monkeypatch: pytest.MonkeyPatch, max_bytes: int | None) -> None:
    """Attention through DecodeBatchBuilder's dense mirror (appended to step after step, rebuilt when
    the batch changes or outgrows it) == attention gathering from the paged cache, over many steps with
    joins, leaves, new tables and resets; the paged cache gets the same writes either way."""
    if max_bytes is not None:  # the mirror over its memory limit: the builder's batches gather instead
        monkeypatch.setattr(paged_attention, "MIRROR_MAX_BYTES", max_bytes)
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    layers = 2
    builder = DecodeBatchBuilder(BS, HKV, torch.device("cpu"))
    cache = torch.randn(layers, 2, NB, HKV, BS, D, generator=gen)
    ref_cache = cache.clone()
    free = list(range(1, NB))
    rng.shuffle(free)
    seqs: list[list] = []  # [position, block table]
    mirrored = 0
    for step in range(300):
        _churn(rng, seqs, free)
        if step % 70 == 69:
            builder.reset()
        positions = [s[0] for s in seqs]
        tables = [s[1] for s in seqs]
        got, _ = builder.build(positions, tables)
        want = build_paged_batch([1] * len(seqs), positions, tables, BS, HKV, torch.device("cpu"))
        assert got.mirror is not None and want.mirror is None
        attn, ref_attn = PagedAttention(cache, got), PagedAttention(ref_cache, want)
        n = len(seqs)
        for layer in range(layers):
            q, k, v = (
                torch.randn(n, HQ, D, generator=gen),
                torch.randn(n, HKV, D, generator=gen),
                torch.randn(n, HKV, D, generator=gen),
            )
            assert torch.equal(attn(layer, q, k, v), ref_attn(layer, q, k, v)), (step, layer)
        mirrored += bool(got.mirror.layers)
        assert torch.equal(cache, ref_cache), step
        for s in seqs:
            s[0] += 1
    assert mirrored == (300 if max_bytes is None else 0)
