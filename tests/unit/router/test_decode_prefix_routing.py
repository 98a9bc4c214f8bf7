"""Prefix-aware decode routing: running streams weighed against the share of a stream's input a decode
worker likely holds, the pool that records inputs and finished outputs, and what forgets them."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from kvrelay_worker.ports import free_port
from kvrelay_worker.router.kserve import WorkerClient
from kvrelay_worker.router.main import build_parser, config_from_args
from kvrelay_worker.router.pool import RolePool, WorkerPool, WorkerState
from kvrelay_worker.router.prefix_index import PrefixIndex
from kvrelay_worker.router.routing import WorkerLoad, cached_fraction, choose_decode
from kvrelay_worker.tokenizer import Tokenizer

from .conftest import toy_generate
from .test_app import MODEL, run_stack

PROMPT = list(range(1000, 1064))  # 4 blocks of 16: a worker can hold all of it


def _old_choose_decode(loads: list[WorkerLoad], exclude: set[str], turn: int) -> str | None:
    """What choose_decode did before it weighed caches: fewest running sequences, ties by rotation."""
    ranked = sorted(loads, key=lambda w: (w.order, w.address))
    place = {w.address: (rank - turn) % len(ranked) for rank, w in enumerate(ranked)}
    candidates = [w for w in loads if w.healthy and w.address not in exclude]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.running_sequences, place[w.address])).address


@pytest.mark.parametrize(
    "running",
    [(0, 0, 0), (3, 1, 2), (2, 2, 5), (0, 4, 0), (7, 7, 7)],
)
def test_weight_zero_is_fewest_streams_whatever_is_cached(running: tuple[int, int, int]) -> None:
    fractions = (1.0, 0.5, 0.0)
    loads = [
        WorkerLoad(a, True, 0, r, order, cached_prefix_fraction=f)
        for a, r, order, f in zip("abc", running, (4, 1, 7), fractions, strict=True)
    ]
    loads.append(WorkerLoad("down", False, 0, 0, 2, cached_prefix_fraction=1.0))
    for turn, exclude in itertools.product(range(4), (set(), {"a"}, {"a", "b", "c"})):
        expected = _old_choose_decode(loads, exclude, turn)
        assert choose_decode(loads, exclude, turn) == expected
        assert choose_decode(loads, exclude, turn, prefix_weight=0.0) == expected


def test_holding_the_whole_prompt_counts_as_w_fewer_streams() -> None:
    def pool(running_b: int) -> list[WorkerLoad]:
        return [WorkerLoad("a", True, 0, 1, 0), WorkerLoad("b", True, 0, running_b, 1, 64, 1.0)]

    assert choose_decode(pool(1), prefix_weight=2.0) == "b"  # as busy: the one holding the prompt
    assert choose_decode(pool(2), prefix_weight=2.0) == "b"  # 1 more stream < W = 2
    assert choose_decode(pool(4), prefix_weight=2.0) == "a"  # 3 more streams > W = 2
    assert choose_decode(pool(4), prefix_weight=4.0) == "b"  # a larger W keeps it there harder
    assert choose_decode(pool(2), prefix_weight=0.0) == "a"  # weight 0: fewest streams only
    assert choose_decode(pool(1), exclude={"b"}, prefix_weight=2.0) == "a"
    half = [WorkerLoad("a", True, 0, 0, 0), WorkerLoad("b", True, 0, 1, 1, 32, 0.5)]
    assert choose_decode(half, prefix_weight=4.0) == "b"  # half the prompt at W 4: worth 2 streams
    assert choose_decode(half, prefix_weight=1.0) == "a"  # at W 1: half a stream, less than 1 more


def test_cached_fraction_is_a_share_in_0_1() -> None:
    assert cached_fraction(32, 64) == 0.5
    assert cached_fraction(64, 64) == 1.0
    assert cached_fraction(80, 64) == 1.0  # an estimate never counts more than the whole input
    assert cached_fraction(0, 0) == 0.0


def _decode_pool(index: PrefixIndex | None, weight: float = 2.0) -> RolePool:
    pool = RolePool("decode", prefix=index, prefix_weight=weight)
    for order, address in enumerate(("a:1", "b:1")):
        pool.workers[address] = WorkerState(WorkerClient(address), order, healthy=True)
    return pool


async def _close(pool: RolePool) -> None:
    for worker in pool.workers.values():
        await worker.client.close()


async def test_a_stream_follows_its_prompt_and_the_answer_counts_for_the_next_turn() -> None:
    pool = _decode_pool(PrefixIndex(block_size=16))
    first = pool.choose_for_stream(PROMPT)
    assert first is not None and first.cached_prefix_tokens == 0
    holder = first.worker.client.address
    first.worker.running_sequences += 1  # still streaming: holding the whole prompt outweighs 1 stream
    again = pool.choose_for_stream(PROMPT)
    assert again is not None and again.worker is first.worker and again.cached_prefix_tokens == 64
    first.worker.running_sequences = 0
    # The stream ends; its prompt and answer (less the last token, never run) are now on that worker.
    answer = list(range(5000, 5033))
    pool.record(holder, PROMPT + answer[:-1])
    follow_up = PROMPT + answer + [7, 8, 9]  # the next turn resends the answer
    nxt = pool.choose_for_stream(follow_up)
    assert nxt is not None and nxt.worker is first.worker and nxt.cached_prefix_tokens == 96
    other = pool.choose_for_stream(list(range(3000, 3040)))  # nothing shared: the rotation decides
    assert other is not None and other.worker is not first.worker and other.cached_prefix_tokens == 0
    await _close(pool)


async def test_without_an_index_streams_go_by_running_streams_alone() -> None:
    pool = _decode_pool(None)
    chosen = [pool.choose_for_stream(PROMPT) for _ in range(4)]
    assert [c.worker.client.address for c in chosen if c] == ["a:1", "b:1", "a:1", "b:1"]
    assert all(c is not None and c.cached_prefix_tokens == 0 for c in chosen)
    pool.record("a:1", PROMPT)  # no index: nothing to record, nothing fails
    await _close(pool)


def _pool_with_workers(decode: list[str]) -> WorkerPool:
    pool = WorkerPool(decode_prefix=PrefixIndex(block_size=16), decode_prefix_weight=2.0)
    role = pool.roles["decode"]
    for order, address in enumerate(decode):
        role.workers[address] = WorkerState(WorkerClient(address), order, healthy=True)
    return pool


async def test_a_decode_worker_marked_down_or_removed_is_forgotten() -> None:
    pool = _pool_with_workers(["a:1", "b:1"])
    decode = pool.roles["decode"]
    assert decode.prefix is not None and pool.roles["prefill"].prefix is None  # separate, per role
    decode.record("a:1", PROMPT)
    decode.record("b:1", PROMPT)
    pool.mark_down(decode.workers["a:1"])
    assert decode.prefix.num_blocks("a:1") == 0 and decode.prefix.num_blocks("b:1") == 4
    await pool.set_addresses("decode", ["a:1"])  # b:1 left discovery
    assert decode.prefix.num_blocks("b:1") == 0
    await pool.close()


async def test_a_decode_worker_failing_its_readiness_check_is_forgotten() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there: the check fails
    pool = _pool_with_workers([address])
    decode = pool.roles["decode"]
    assert decode.prefix is not None
    decode.record(address, PROMPT)
    await pool.check_all()
    assert not decode.workers[address].healthy and decode.prefix.num_blocks(address) == 0
    await pool.close()


def test_decode_prefix_weight_flag(tokenizer_dir: Path) -> None:
    def parse(*extra: str):  # type: ignore[no-untyped-def]
        return config_from_args(build_parser().parse_args(["--model", str(tokenizer_dir), *extra]))

    assert parse().decode_prefix_weight == 2.0
    assert parse("--decode-prefix-weight", "0").decode_prefix_weight == 0.0
    assert parse("--decode-prefix-weight", "3.5").decode_prefix_weight == 3.5
    with pytest.raises(ValueError):
        parse("--decode-prefix-weight", "-1")


async def test_the_next_turn_goes_to_the_decode_worker_that_ran_the_last(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    """Through the router: turn 2 resends turn 1's prompt and answer, and goes where they were computed
    (by rotation alone it would go to the other, idle decode worker)."""
    async with run_stack(tokenizer_dir, tokenizer) as stack:
        prompt = list(range(10, 58))  # 3 blocks
        await stack.client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        answer = toy_generate(prompt, 20, tokenizer.vocab_size)
        # 70 tokens, of which the worker holds 67 (all but the answer's last token): 4 full blocks
        follow_up = [*prompt, *answer, 30, 31]
        await stack.client.completions.create(model=MODEL, prompt=follow_up, max_tokens=4, temperature=0)
        assert sorted(w.decode_calls for w in stack.decode) == [0, 2]
        metrics = (await stack.http.get("/metrics")).text
        assert f'kvrelay_router_decode_routing_total{{model="{MODEL}",reason="prefix"}} 1.0' in metrics
        assert f'kvrelay_router_decode_routing_total{{model="{MODEL}",reason="load"}} 1.0' in metrics
        assert f'kvrelay_router_decode_prefix_hit_tokens_total{{model="{MODEL}"}} 64.0' in metrics
