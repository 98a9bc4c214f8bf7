"""Prefix-aware prefill routing: the router's index of what each worker likely caches, the cost that
weighs it against queued tokens, and the pool that records and forgets."""

from __future__ import annotations

import pytest
from kvrelay_worker.router.kserve import WorkerClient
from kvrelay_worker.router.pool import RolePool, WorkerState
from kvrelay_worker.router.prefix_index import PrefixIndex
from kvrelay_worker.router.routing import WorkerLoad, choose_prefill

SYSTEM = list(range(1000, 1048))  # 3 blocks of 16


def test_index_matches_the_longest_recorded_prefix_and_ages_out() -> None:
    index = PrefixIndex(block_size=16, capacity_blocks=4)
    first = index.hashes([*SYSTEM, 7, 8])
    assert len(first) == 3  # full blocks only
    index.record("a", first)
    assert index.cached_tokens("a", index.hashes([*SYSTEM, 9])) == 48
    assert index.cached_tokens("a", index.hashes([*SYSTEM[:16], *range(16)])) == 16  # only block 1 shared
    assert index.cached_tokens("a", index.hashes([5, *SYSTEM])) == 0  # shifted: no block is the same KV
    assert index.cached_tokens("b", first) == 0
    other = index.hashes(list(range(2000, 2032)))  # 2 more blocks: 5 > capacity 4, the oldest goes
    index.record("a", other)
    assert index.num_blocks("a") == 4
    assert index.cached_tokens("a", first) == 0  # its first block aged out, so no prefix matches
    assert index.cached_tokens("a", other) == 32
    index.forget("a")
    assert index.cached_tokens("a", other) == 0 and index.num_blocks("a") == 0
    with pytest.raises(ValueError):
        PrefixIndex(block_size=0)


def test_cost_weighs_cached_prompt_tokens_against_queued_ones() -> None:
    def pool(queued_a: int, queued_b: int, cached_b: int) -> list[WorkerLoad]:
        return [WorkerLoad("a", True, queued_a, 0, 0), WorkerLoad("b", True, queued_b, 0, 1, cached_b)]

    assert choose_prefill(pool(0, 0, 48), prefix_weight=1.0) == "b"  # idle both: the one holding the prefix
    assert choose_prefill(pool(0, 40, 48), prefix_weight=1.0) == "b"  # 40 queued < 48 saved
    assert choose_prefill(pool(0, 60, 48), prefix_weight=1.0) == "a"  # 60 queued > 48 saved
    assert choose_prefill(pool(0, 60, 48), prefix_weight=2.0) == "b"  # a cached token weighs 2 queued
    assert choose_prefill(pool(0, 40, 48), prefix_weight=0.0) == "a"  # weight 0: least queued only
    assert choose_prefill(pool(0, 0, 48), exclude={"b"}, prefix_weight=1.0) == "a"


def _role_pool(prefix: PrefixIndex | None) -> RolePool:
    pool = RolePool("prefill", prefix=prefix)
    for order, address in enumerate(("a:1", "b:1")):
        pool.workers[address] = WorkerState(WorkerClient(address), order, healthy=True)
    return pool


async def test_a_prompt_follows_its_prefix_and_new_prompts_still_spread() -> None:
    pool = _role_pool(PrefixIndex(block_size=16))
    first = pool.choose_for_prompt([*SYSTEM, 1, 2])
    assert first is not None and first.cached_prefix_tokens == 0
    # the next turn of the same conversation, and a new user on the same system prompt: same worker
    for prompt in ([*SYSTEM, 1, 2, 3, 4], [*SYSTEM, 99]):
        again = pool.choose_for_prompt(prompt)
        assert again is not None and again.worker is first.worker and again.cached_prefix_tokens == 48
    other = pool.choose_for_prompt(list(range(3000, 3040)))  # nothing shared: the rotation decides
    assert other is not None and other.worker is not first.worker and other.cached_prefix_tokens == 0
    # a worker that failed or left is forgotten: its cache may be gone
    pool.forget(first.worker.client.address)
    moved = pool.choose_for_prompt([*SYSTEM, 5])
    assert moved is not None and moved.cached_prefix_tokens == 0
    follow = pool.choose_for_prompt([*SYSTEM, 6])
    assert follow is not None and follow.worker is moved.worker and follow.cached_prefix_tokens == 48
    for worker in pool.workers.values():
        await worker.client.close()


async def test_without_an_index_prompts_go_by_queue_alone() -> None:
    pool = _role_pool(None)
    chosen = [pool.choose_for_prompt([*SYSTEM, 1]) for _ in range(4)]
    assert [c.worker.client.address for c in chosen if c] == ["a:1", "b:1", "a:1", "b:1"]
    assert all(c is not None and c.cached_prefix_tokens == 0 for c in chosen)
    for worker in pool.workers.values():
        await worker.client.close()
