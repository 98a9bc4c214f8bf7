"""The decode side of the prefix cache: a decode worker that still holds a prompt's leading blocks
(the previous turn: its prompt, relayed, and its answer, computed) asks the relay for the rest only.

The relay is played by a copy between two engines' caches, as in test_engine_api; outputs are
compared with full recompute (greedy, token-exact)."""

from __future__ import annotations

import random

import pytest
import torch
from kvrelay_worker.engine import SamplingParams

BLOCK = 4


def _relay(prefill, decode, request_id: str, prompt: list[int], max_tokens: int, fail: bool = False):
    """Prefill `prompt`, hand its KV to `decode` the way the relay does (only the blocks past the
    decode cache's hits), run decode to the end; (tokens, the KV target, prompt tokens decode computed)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prefill.add_request(request_id, prompt, params, now=0.0, prefill_only=True)
    (first,) = prefill.step(now=0.0).outputs
    decode.add_decode_request(request_id, prompt, first.new_token_ids[0], params, now=0.0, remote_kv=True)
    step = decode.step(now=0.0)
    (target,) = step.kv_targets
    held = first.kv_block_ids[target.skip_blocks :]
    assert len(held) == len(target.block_ids)
    if held and not fail:
        decode.kv_cache[:, :, torch.tensor(target.block_ids)] = prefill.kv_cache[:, :, torch.tensor(held)]
    prefill.release(request_id)
    decode.remote_kv_done(request_id, ok=not fail)
    tokens, computed = list(first.new_token_ids), 0
    while decode.has_work():
        step = decode.step(now=0.0)
        computed += step.num_prompt_tokens
        tokens += [t for o in step.outputs if o.request_id == request_id for t in o.new_token_ids]
    return tokens, target, computed


@pytest.fixture
def engines(make_engine):
    return make_engine(num_blocks=64, block_size=BLOCK), make_engine(num_blocks=64, block_size=BLOCK)


@pytest.fixture(scope="module")
def turns(tiny_model, reference) -> tuple[list[int], list[int], list[int]]:
    """A first turn's prompt (17 tokens: 4 full blocks and 1), its 9-token answer, and the second
    turn's prompt: the first prompt, the answer, then 6 new tokens."""
    rng = random.Random(5)
    vocab = tiny_model.config.vocab_size
    first = [rng.randrange(5, vocab) for _ in range(17)]
    answer = reference(first, 9)
    return first, answer, first + answer + [rng.randrange(5, vocab) for _ in range(6)]


def test_a_second_turn_fetches_only_what_the_decode_worker_lacks(engines, turns, reference) -> None:
    prefill, decode = engines
    first, answer, second = turns
    tokens, target, _ = _relay(prefill, decode, "t1", first, 9)
    assert tokens == answer and target.skip_blocks == 0 and len(target.block_ids) == 5  # ceil(17 / 4)
    tokens, target, computed = _relay(prefill, decode, "t2", second, 8)
    assert tokens == reference(second, 8)
    # The decode worker holds the first prompt (relayed) and 8 of the 9 answer tokens (computed; the
    # last was never fed): 25 tokens, 6 full blocks. The second prompt has 32 tokens, 8 blocks.
    assert target.skip_blocks == (len(first) + len(answer) - 1) // BLOCK == 6
    assert len(target.block_ids) == 8 - 6 and computed == 0
    stats = decode.stats()
    assert (stats.num_cache_query_tokens, stats.num_cache_hit_tokens) == (17 + 32, 6 * BLOCK)


def test_a_prompt_the_decode_worker_holds_whole_fetches_nothing(engines, turns, reference) -> None:
    prefill, decode = engines
    first, answer, _ = turns
    _relay(prefill, decode, "t1", first, 9)
    again = (first + answer)[:24]  # 6 full blocks, all cached on decode
    tokens, target, computed = _relay(prefill, decode, "again", again, 5)
    assert (target.skip_blocks, target.block_ids, computed) == (6, [], 0)
    assert tokens == reference(again, 5)


def test_a_failed_partial_fetch_recomputes_only_past_the_cached_prefix(engines, turns, reference) -> None:
    prefill, decode = engines
    first, _, second = turns
    _relay(prefill, decode, "t1", first, 9)
    tokens, target, computed = _relay(prefill, decode, "t2", second, 8, fail=True)
    assert target.skip_blocks == 6 and computed == len(second) - 6 * BLOCK
    assert tokens == reference(second, 8)
    assert decode.scheduler.pool.num_used_blocks == 0  # everything freed (cached blocks stay cached)


def test_decode_without_the_cache_fetches_every_block(make_engine, turns, reference) -> None:
    prefill, decode = (
        make_engine(num_blocks=64, block_size=BLOCK),
        make_engine(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False),
    )
    first, _, second = turns
    _relay(prefill, decode, "t1", first, 9)
    tokens, target, _ = _relay(prefill, decode, "t2", second, 8)
    assert (target.skip_blocks, len(target.block_ids)) == (0, 8)
    assert tokens == reference(second, 8)
