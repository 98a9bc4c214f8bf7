"""Byte-exact relay of random block sets between real processes: NIXL over each pinned UCX transport
(tcp, cma, posix/sysv shared memory) and the plain tcp backend.

Each NIXL flavour pins UCX_TLS (kv_testlib.FLAVOURS) and each test asserts, from UCX's own protocol
report, that the reader's READs went over exactly that transport."""

from __future__ import annotations

import random
from typing import Any

import pytest
from kv_peer import blocks_digest, global_pattern, rank_slice
from kv_testlib import FLAVOURS, LAYOUT, SECRET, wait_all_released
from kvrelay_worker.kv import KVHandle, KVLayout, merge_rank_handles

NUM_BLOCKS = 64
SEED = 7


def expected_digest(seed: int, reader_tp: int, reader_rank: int, src_ids: list[int]) -> str:
    """Digest of what reader rank must hold: the holder's blocks, restricted to the reader's heads."""
    full = global_pattern(KVLayout(**LAYOUT), NUM_BLOCKS, seed)
    return blocks_digest(rank_slice(full, KVLayout(**LAYOUT, tp_size=reader_tp), reader_rank), src_ids)


def random_sets(rng: random.Random, count: int) -> list[tuple[int, list[int], list[int]]]:
    """(num_tokens, holder block ids, reader block ids); ids are distinct, shuffled, never block 0."""
    sets = []
    for _ in range(count):
        num_tokens = rng.randint(1, 24 * LAYOUT["block_size"])
        n = -(-num_tokens // LAYOUT["block_size"])
        sets.append((num_tokens, rng.sample(range(1, NUM_BLOCKS), n), rng.sample(range(1, NUM_BLOCKS), n)))
    return sets


def assert_read_over_pinned_transport(flavour: str, readers: list[Any]) -> None:
    """Every reader of a NIXL flavour moved its bytes over the flavour's transport and no other."""
    if FLAVOURS[flavour].read_transports:
        for reader in readers:
            reader.assert_read_transport()


@pytest.mark.parametrize("flavour", ["nixl-tcp", "nixl-cma", "nixl-shm", "tcp"])
def test_twenty_random_block_sets_are_byte_exact(pool: Any, flavour: str) -> None:
    holder, reader = pool(flavour, seed=SEED), pool(flavour)
    before = len(holder.call(op="status")["released"])
    rng = random.Random(f"sets-{flavour}")
    sets = random_sets(rng, 20)
    for i, (num_tokens, src_ids, dst_ids) in enumerate(sets):
        handle = holder.call(op="publish", request_id=f"r{i}", block_ids=src_ids, num_tokens=num_tokens)[
            "handle"
        ]
        reply = reader.call(op="fetch", handle=handle, dst_block_ids=dst_ids, timeout_s=20)
        assert reply["ok"], reply
        assert reply["digest"] == expected_digest(SEED, 1, 0, src_ids), f"set {i} differs after relay"
    status = wait_all_released(holder, before + len(sets))
    assert sorted(map(sorted, status["released"][before:])) == sorted(sorted(s[1]) for s in sets)
    assert (status["held_blocks"], status["held_bytes"]) == (0, 0)
    assert_read_over_pinned_transport(flavour, [reader])


@pytest.mark.parametrize("flavour", ["nixl-cma", "nixl-tcp", "tcp"])
@pytest.mark.parametrize(("holder_tp", "reader_tp"), [(1, 2), (2, 2), (2, 1), (4, 2)])
def test_tensor_parallel_readers_get_their_head_slices(
    pool: Any, flavour: str, holder_tp: int, reader_tp: int
) -> None:
    holders = [pool(flavour, tp_size=holder_tp, tp_rank=q, seed=SEED) for q in range(holder_tp)]
    readers = [pool(flavour, tp_size=reader_tp, tp_rank=r) for r in range(reader_tp)]
    before = [len(h.call(op="status")["released"]) for h in holders]
    rng = random.Random(f"tp-{flavour}-{holder_tp}-{reader_tp}")
    for i, (num_tokens, src_ids, dst_ids) in enumerate(random_sets(rng, 4)):
        parts = [
            KVHandle.model_validate(
                h.call(
                    op="publish",
                    request_id=f"r{i}",
                    block_ids=src_ids,
                    num_tokens=num_tokens,
                    handle_id=f"h{i}",
                )["handle"]
            )
            for h in holders
        ]
        handle = merge_rank_handles(parts, SECRET.encode()).model_dump(mode="json")
        for r, reader in enumerate(readers):
            reply = reader.call(op="fetch", handle=handle, dst_block_ids=dst_ids, timeout_s=20)
            assert reply["ok"], reply
            assert reply["digest"] == expected_digest(SEED, reader_tp, r, src_ids), f"rank {r} set {i}"
    # A holder rank serving two reader ranks releases only after both are done; with reader TP below
    # the holder's, every holder rank is read (by one reader rank) and releases.
    for holder, done in zip(holders, before, strict=True):
        status = wait_all_released(holder, done + 4)
        assert len(status["released"]) == done + 4
        assert status["held_blocks"] == 0
    assert_read_over_pinned_transport(flavour, readers)


@pytest.mark.parametrize("flavour", ["nixl-cma", "nixl-tcp", "tcp"])
def test_a_reader_holding_the_leading_blocks_reads_only_the_rest(pool: Any, flavour: str) -> None:
    """A decode worker's prefix cache holds the first blocks: it reads the others, and a claim that
    reads nothing (the cache holds them all) still lets the holder free the blocks at once."""
    holder, reader = pool(flavour, seed=SEED), pool(flavour)
    before = len(holder.call(op="status")["released"])
    rng = random.Random(f"skip-{flavour}")
    src_ids = rng.sample(range(1, NUM_BLOCKS), 12)
    free = sorted(set(range(1, NUM_BLOCKS)) - set(src_ids))
    cases = [(5, rng.sample(free, 7)), (11, rng.sample(free, 1)), (12, [])]
    others = sorted(set(free) - {b for _, ids in cases for b in ids})
    others_before = reader.call(op="digest", block_ids=others)["digest"]
    for i, (skip, dst_ids) in enumerate(cases):
        tokens = 12 * LAYOUT["block_size"]
        handle = holder.call(op="publish", request_id=f"s{i}", block_ids=src_ids, num_tokens=tokens)["handle"]
        reply = reader.call(op="fetch", handle=handle, dst_block_ids=dst_ids, skip_blocks=skip, timeout_s=20)
        assert reply["ok"], reply
        assert reply["digest"] == expected_digest(SEED, 1, 0, src_ids[skip:]), f"skip {skip} differs"
    assert reader.call(op="digest", block_ids=others)["digest"] == others_before  # nothing else written
    status = wait_all_released(holder, before + len(cases))  # well before the 30 s lease
    assert (status["held_blocks"], status["held_bytes"]) == (0, 0)
    # Skipping more blocks than the handle holds is refused, naming the bound.
    two = 2 * LAYOUT["block_size"]
    handle = holder.call(op="publish", request_id="bad", block_ids=src_ids[:2], num_tokens=two)["handle"]
    reply = reader.call(op="fetch", handle=handle, dst_block_ids=[], skip_blocks=3, timeout_s=5)
    assert not reply["ok"] and reply["reason"] == "bad_request", reply
