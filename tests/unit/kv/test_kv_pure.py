"""Pure parts of the relay: handle signing, layout compatibility, run planning, leases, metrics."""

from __future__ import annotations

import asyncio
import random
import socket
import time

import pytest
import torch
from kvrelay_worker.kv import (
    KVHandle,
    KVHolderRank,
    KVLayout,
    KVLayoutMismatch,
    KVMetrics,
    KVTransferError,
    check_compatible,
    create_transport,
    merge_rank_handles,
)
from kvrelay_worker.kv.leases import Lease, LeaseTable
from kvrelay_worker.kv.runs import plan_runs, readers_of, source_slices
from prometheus_client import CollectorRegistry

BASE = dict(model_id="m@1", num_layers=3, block_size=4, num_kv_heads=8, head_dim=8, dtype="bfloat16")


def layout(**kw: object) -> KVLayout:
    return KVLayout(**{**BASE, **kw})


def make_handle(rank: int = 0, handle_id: str = "h1", tp: int = 1) -> KVHandle:
    me = KVHolderRank(
        rank=rank,
        agent_name=f"a{rank}",
        endpoint=f"127.0.0.1:{9000 + rank}",
        block_ids=[3, 4],
        num_blocks_total=16,
    )
    return KVHandle(
        handle_id=handle_id,
        request_id="r",
        backend="tcp",
        holder=me,
        layout=layout(tp_size=tp),
        ranks=[me],
        num_tokens=7,
        lease_expires_at=100.0,
    )


def test_signature_covers_every_field() -> None:
    handle = make_handle().signed(b"s")
    assert handle.verify(b"s")
    assert not handle.verify(b"other")
    assert KVHandle.from_json(handle.to_json()).verify(b"s")
    for edit in (
        {"num_tokens": 8},
        {"lease_expires_at": 200.0},
        {"request_id": "x"},
        {"layout": layout(block_size=8)},
    ):
        assert not handle.model_copy(update=edit).verify(b"s"), edit


def test_check_compatible_names_both_sides() -> None:
    check_compatible(layout(tp_size=2), layout(tp_size=4))
    with pytest.raises(KVLayoutMismatch, match=r"block_size 4 \(holder\) != 16 \(reader\)"):
        check_compatible(layout(), layout(block_size=16))
    with pytest.raises(KVLayoutMismatch, match=r"dtype bfloat16 \(holder\) != float16 \(reader\)"):
        check_compatible(layout(), layout(dtype="float16"))
    with pytest.raises(KVLayoutMismatch, match=r"model_id m@1 \(holder\) != m@2 \(reader\)"):
        check_compatible(layout(), layout(model_id="m@2"))
    check_compatible(layout(tp_size=4), layout(tp_size=2))  # a reader rank reads from two holder ranks
    with pytest.raises(ValueError, match="not divisible"):
        layout(tp_size=3)


def test_merge_rank_handles() -> None:
    merged = merge_rank_handles([make_handle(1, tp=2), make_handle(0, tp=2)], b"s")
    assert [r.rank for r in merged.ranks] == [0, 1]
    assert merged.holder.rank == 0 and merged.verify(b"s")
    with pytest.raises(ValueError, match=r"ranks 0\.\.1"):
        merge_rank_handles([make_handle(0, tp=2)], b"s")
    with pytest.raises(ValueError, match="disagree"):
        merge_rank_handles([make_handle(0, tp=2), make_handle(1, "h2", tp=2)], b"s")


@pytest.mark.parametrize("ids", ["random", "segments"])
@pytest.mark.parametrize(
    ("holder_tp", "reader_tp"), [(1, 1), (1, 2), (2, 2), (2, 4), (1, 8), (2, 1), (4, 1), (8, 2), (4, 2)]
)
def test_planned_runs_move_exactly_the_reader_heads(holder_tp: int, reader_tp: int, ids: str) -> None:
    full = torch.randint(-1000, 1000, (3, 2, 16, 8, 4, 8), dtype=torch.int16).view(torch.bfloat16)
    holder_l, reader_l = layout(tp_size=holder_tp), layout(tp_size=reader_tp)
    rng = random.Random(holder_tp * 10 + reader_tp)
    if ids == "random":
        src_ids, dst_ids = rng.sample(range(1, 16), 5), rng.sample(range(1, 12), 5)
    else:  # runs of consecutive ids on both sides, broken on one side or the other
        src_ids, dst_ids = [3, 4, 5, 9, 10, 11, 15], [1, 2, 3, 4, 7, 8, 11]
    hl, rl = holder_l.num_kv_heads_local, reader_l.num_kv_heads_local
    readers: dict[int, list[int]] = {}
    for r in range(reader_tp):
        reader = torch.zeros((3, 2, 12, rl, 4, 8), dtype=torch.bfloat16)
        dst_bytes = reader.view(-1).view(torch.uint8)
        sources = source_slices(holder_l, reader_l, r)
        assert sum(s.num_heads for s in sources) == rl  # every head of the reader rank, once
        assert len(sources) == max(holder_tp // reader_tp, 1)
        for s in sources:
            readers.setdefault(s.holder_rank, []).append(r)
            assert s.holder_rank * hl + s.holder_head == r * rl + s.reader_head
            holder = full[:, :, :, s.holder_rank * hl : (s.holder_rank + 1) * hl].contiguous()
            src_bytes = holder.view(-1).view(torch.uint8)
            plan = plan_runs(holder_l, 16, src_ids, reader_l, 12, r, dst_ids, s.holder_rank)
            for src, dst, length in plan.tolist():
                dst_bytes[dst : dst + length] = src_bytes[src : src + length]
        expect = full[:, :, src_ids, r * rl : (r + 1) * rl]
        assert torch.equal(reader[:, :, dst_ids].view(torch.int16), expect.contiguous().view(torch.int16))
        untouched = [b for b in range(12) if b not in dst_ids]
        assert not reader[:, :, untouched].view(torch.int16).any()
    for q in range(holder_tp):  # the holder waits for exactly the readers that read from it
        assert readers_of(holder_l, reader_l, q) == readers[q]


def test_source_slices_pair_degrees_that_do_not_divide_each_other() -> None:
    """6 KV heads, holder TP2 (3 each) -> reader TP3 (2 each): reader rank 1 reads from both holder ranks."""
    holder_l, reader_l = layout(num_kv_heads=6, tp_size=2), layout(num_kv_heads=6, tp_size=3)
    assert [
        (s.holder_rank, s.holder_head, s.reader_head, s.num_heads)
        for s in source_slices(holder_l, reader_l, 1)
    ] == [
        (0, 2, 0, 1),
        (1, 0, 1, 1),
    ]
    assert readers_of(holder_l, reader_l, 0) == [0, 1] and readers_of(holder_l, reader_l, 1) == [1, 2]


def test_contiguous_blocks_coalesce_and_bad_ids_are_refused() -> None:
    lay = layout()
    runs = plan_runs(lay, 16, [1, 2, 3], lay, 16, 0, [4, 5, 6])
    assert runs.shape == (6, 3)  # one run per (layer, k|v) plane
    assert (runs[:, 2] == 3 * 8 * 4 * 8 * 2).all()
    scattered = plan_runs(lay, 16, [1, 3, 2], lay, 16, 0, [4, 5, 6])
    assert scattered.shape == (18, 3)  # nothing continues on both sides
    mixed = plan_runs(lay, 16, [1, 2, 3, 7, 8], lay, 16, 0, [4, 5, 6, 9, 11])
    assert mixed[:3, 2].tolist() == [3 * 8 * 4 * 8 * 2, 8 * 4 * 8 * 2, 8 * 4 * 8 * 2]  # 1-3, 7, 8 per plane
    with pytest.raises(KVLayoutMismatch, match="block id 0"):
        plan_runs(lay, 16, [0], lay, 16, 0, [1])
    with pytest.raises(KVLayoutMismatch, match="2 blocks \\(holder\\) != 1"):
        plan_runs(lay, 16, [1, 2], lay, 16, 0, [1])


def test_leases_release_exactly_once_on_a_virtual_clock() -> None:
    held: list[tuple[int, int]] = []
    freed: list[list[int]] = []
    table = LeaseTable(on_change=lambda b, n: held.append((b, n)))
    table.add(Lease(make_handle(), [3, 4], 200, expires_at=10.0, on_release=freed.append))
    assert table.held() == (2, 200) and held[-1] == (2, 200)
    with pytest.raises(KVTransferError, match="unknown_handle"):
        table.claim("nope", 0, 1, now=1.0, hold_until=2.0)
    lease = table.claim("h1", 0, 2, now=1.0, hold_until=20.0)  # two reader ranks, hold to t=20
    assert lease.expires_at == 20.0
    assert table.expire(now=15.0) == []
    assert table.reader_done("h1", 0) is False  # waits for the second reader
    assert table.reader_done("h1", 1) is True
    assert table.reader_done("h1", 1) is False and table.expire(now=99.0) == []
    assert freed == [[3, 4]] and table.held() == (0, 0) and held[-1] == (0, 0)
    table.add(Lease(make_handle(handle_id="h2"), [5], 100, expires_at=10.0, on_release=freed.append))
    with pytest.raises(KVTransferError, match="expired"):
        table.claim("h2", 0, 1, now=10.0, hold_until=30.0)
    assert table.expire(now=10.0) == ["h2"]
    assert freed == [[3, 4], [5]]


async def test_metrics_count_bytes_and_failures_in_process() -> None:
    registry = CollectorRegistry()
    metrics = KVMetrics("m@1", "decode", registry=registry)
    lay = layout()
    src = torch.randint(-1000, 1000, (3, 2, 16, 8, 4, 8), dtype=torch.int16).view(torch.bfloat16)
    dst = torch.zeros_like(src)
    freed: list[list[int]] = []
    with (
        create_transport("tcp", src, lay) as holder,
        create_transport("tcp", dst, lay, metrics=metrics) as reader,
    ):
        handle = holder.publish("r", [2, 3], 8, freed.append)
        await reader.fetch(handle, [5, 6], timeout_s=5)
        assert torch.equal(dst[:, :, [5, 6]].view(torch.int16), src[:, :, [2, 3]].view(torch.int16))
        with pytest.raises(KVTransferError) as err:
            await reader.fetch(handle.model_copy(update={"num_tokens": 5}), [5, 6], timeout_s=5)
        assert err.value.reason == "bad_signature"
    labels = {"model": "m@1", "role": "decode"}
    assert registry.get_sample_value("kvrelay_kv_transfer_bytes_total", labels) == 2 * lay.block_bytes_local()
    assert registry.get_sample_value("kvrelay_kv_transfer_seconds_count", labels) == 1
    assert (
        registry.get_sample_value("kvrelay_kv_transfer_failures_total", {**labels, "reason": "bad_signature"})
        == 1
    )
    assert freed == [[2, 3]]
    assert asyncio.get_running_loop() is not None


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
async def test_cancel_and_close_stop_a_fetch_waiting_on_a_silent_holder(backend: str) -> None:
    """A holder that accepts the claim connection and never answers: cancel and close end the fetch."""
    lay = layout()
    dst = torch.zeros((3, 2, 16, 8, 4, 8), dtype=torch.bfloat16)
    silent = socket.create_server(("127.0.0.1", 0))
    me = KVHolderRank(
        rank=0,
        agent_name="silent",
        endpoint=f"127.0.0.1:{silent.getsockname()[1]}",
        block_ids=[3, 4],
        num_blocks_total=16,
    )
    handle = KVHandle(
        request_id="r",
        backend=backend,
        holder=me,
        layout=lay,
        ranks=[me],
        num_tokens=8,
        lease_expires_at=time.time() + 60,
    ).signed(b"x")
    reader = create_transport(
        backend, dst, lay, metrics=KVMetrics("m@1", "decode", registry=CollectorRegistry())
    )
    reader.start()
    try:
        task = asyncio.create_task(reader.fetch(handle, [5, 6], timeout_s=30))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0  # not the 30 s deadline, not the 5 s cancel grace
        task = asyncio.create_task(reader.fetch(handle, [5, 6], timeout_s=30))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await asyncio.to_thread(reader.close)
        with pytest.raises(KVTransferError) as err:
            await task
        assert err.value.reason == "cancelled"
        assert time.monotonic() - started < 2.0
        assert not dst.view(torch.int16).any()  # nothing was written into the destination blocks
    finally:
        reader.close()
        silent.close()
