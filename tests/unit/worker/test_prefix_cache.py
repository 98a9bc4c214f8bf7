"""The prefix cache: chained block hashes, the pool's LRU of cached blocks, the scheduler's reuse of a
cached prefix, and greedy outputs equal to full recompute with the cache on (batch 1..32, multi-turn,
evictions and preemptions under block pressure)."""

from __future__ import annotations

import random

import pytest
from engine_testing import count_preemptions
from kvrelay_worker.engine import Request, SamplingParams
from kvrelay_worker.engine.block_pool import BlockPool
from kvrelay_worker.engine.scheduler import Scheduler, SchedulerConfig
from kvrelay_worker.model import LlamaForCausalLM
from kvrelay_worker.prefix_hash import chain_hashes, root_hash

# ---- hashes and the pool ------------------------------------------------------------------------


def test_a_block_hash_names_its_whole_prefix() -> None:
    root = root_hash("model|float32")
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4, root)
    assert len(a) == 2  # full blocks only
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, root) == a  # same tokens, same hashes
    b = chain_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4, root)
    assert b[1] != a[1]  # the same block after another prefix is other KV
    assert chain_hashes([1, 2, 3, 4], 4, root_hash("model|bfloat16")) != a[:1]  # the salt counts
    assert chain_hashes([5, 6, 7, 8], 4, a[0]) == a[1:]  # a chain goes on from its last hash
    assert len({*a, *b}) == 4 and all(len(h) == 16 for h in a)


def test_freed_blocks_stay_cached_until_handed_out_least_recently_freed_first() -> None:
    pool = BlockPool(5)  # 4 usable
    h0, h1 = chain_hashes(list(range(8)), 4, root_hash(""))
    ids = pool.allocate(2)
    assert ids == [1, 2]
    pool.register(1, h0)
    pool.register(2, h1)
    pool.register(2, h0)  # already registered: left as is
    pool.free(ids)
    assert (pool.num_free_blocks, pool.num_cached_blocks, pool.usage) == (4, 2, 0.0)
    assert pool.lookup([h0, h1, b"x" * 16]) == [1, 2]
    assert pool.lookup([h1]) == [2] and pool.lookup([b"x" * 16, h0]) == []
    assert pool.num_free_after_touch([1, 2]) == 2
    pool.touch([1, 2])
    pool.touch([1])  # a second request sharing the first block
    assert pool.ref_counts[1:3] == [2, 1] and pool.num_free_blocks == 2
    other = pool.allocate(1)
    assert other == [3]
    pool.register(3, h0)  # the same KV computed twice: the first block keeps the hash
    assert pool.lookup([h0]) == [1]
    pool.free([1])
    pool.free([1, 2])
    pool.free(other)
    # free queue: 4 (never used), then 2 and 1 (the table freed tail first), then 3
    assert pool.allocate(2) == [4, 2]
    assert (pool.num_evictions, pool.lookup([h0, h1]), pool.num_cached_blocks) == (1, [1], 1)
    assert pool.allocate(2) == [1, 3] and pool.num_evictions == 2 and pool.num_cached_blocks == 0


# ---- the scheduler ------------------------------------------------------------------------------


def _step(scheduler: Scheduler, token: int = 7) -> dict[str, list[int]]:
    """One step with every sampled token = ``token``; the block table each scheduled request used."""
    out = scheduler.schedule(0.0)
    tables = {s.request_id: list(s.block_ids) for s in out.seqs}
    scheduler.update(out, {s.request_id: token for s in out.seqs if s.sample})
    return tables


def test_a_second_request_shares_the_cached_prefix_blocks() -> None:
    scheduler = Scheduler(SchedulerConfig(num_blocks=16, block_size=4))
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    scheduler.add_request(Request("a", prompt, SamplingParams(max_tokens=8), 0.0))
    first = _step(scheduler)["a"]
    scheduler.add_request(Request("b", [*prompt[:8], 55, 56, 57], SamplingParams(max_tokens=8), 0.0))
    out = scheduler.schedule(0.0)
    (b,) = [s for s in out.seqs if s.request_id == "b"]
    assert b.start_pos == 8 and b.token_ids == [55, 56, 57]  # only the tail is computed
    assert b.block_ids[:2] == first[:2] and b.block_ids[2] != first[2]
    assert [scheduler.pool.ref_counts[i] for i in first[:2]] == [2, 2]
    assert (scheduler.num_cache_query_tokens, scheduler.num_cache_hit_tokens) == (10 + 11, 8)
    assert out.num_prompt_tokens == 3
    for rid in ("a", "b"):
        scheduler.abort(rid)
    assert scheduler.pool.num_used_blocks == 0 and scheduler.pool.num_cached_blocks >= 2


def test_whole_cached_prompt_still_computes_its_last_block() -> None:
    """A prompt of exactly 2 cached blocks reuses one: the block with the last token is recomputed,
    since the step samples from that token's logits and a shared block is never written."""
    scheduler = Scheduler(SchedulerConfig(num_blocks=16, block_size=4))
    prompt = list(range(200, 208))
    scheduler.add_request(Request("a", prompt, SamplingParams(max_tokens=1), 0.0))
    _step(scheduler)
    assert scheduler.pool.num_cached_blocks == 2 and scheduler.pool.num_used_blocks == 0
    scheduler.add_request(Request("b", prompt, SamplingParams(max_tokens=1), 0.0))
    out = scheduler.schedule(0.0)
    assert (out.seqs[0].start_pos, out.seqs[0].token_ids) == (4, prompt[4:])
    scheduler.abort("b")


@pytest.mark.parametrize(
    ("config", "params"),
    [
        (SchedulerConfig(num_blocks=16, block_size=4, enable_prefix_caching=False), SamplingParams()),
        (SchedulerConfig(num_blocks=16, block_size=4), SamplingParams(prompt_logprobs=1)),
    ],
    ids=["cache off", "prompt_logprobs"],
)
def test_no_cached_prefix_when_off_or_when_the_prompt_is_scored(
    config: SchedulerConfig, params: SamplingParams
) -> None:
    scheduler = Scheduler(config)
    prompt = list(range(300, 310))
    scheduler.add_request(Request("a", prompt, SamplingParams(max_tokens=1), 0.0))
    _step(scheduler)
    scheduler.add_request(Request("b", prompt, params, 0.0))
    out = scheduler.schedule(0.0)
    assert out.seqs[0].start_pos == 0 and scheduler.num_cache_hit_tokens == 0
    scheduler.abort("b")


# ---- outputs --------------------------------------------------------------------------------------

NUM_PROMPTS = 32


@pytest.fixture(scope="module")
def shared_prefix_workload(
    tiny_model: LlamaForCausalLM, reference
) -> tuple[list[list[int]], list[list[int]]]:
    """32 prompts over 4 shared system prefixes (13 to 45 tokens: block-aligned and not), some exact
    repeats, and second turns that resend a first turn's prompt and answer; references by full recompute."""
    rng = random.Random(99)
    vocab = tiny_model.config.vocab_size
    systems = [[rng.randrange(5, vocab) for _ in range(n)] for n in (13, 16, 32, 45)]
    prompts = [
        systems[i % 4] + [rng.randrange(5, vocab) for _ in range(rng.randint(1, 30))] for i in range(24)
    ]
    prompts += [prompts[1], prompts[6]]  # repeats: all but the last block cached
    firsts = [reference(p, 8) for p in prompts[:6]]
    news = [[rng.randrange(5, vocab) for _ in range(5)] for _ in firsts]
    prompts += [p + out + new for p, out, new in zip(prompts[:6], firsts, news, strict=True)]
    assert len(prompts) == NUM_PROMPTS
    return prompts, [reference(p, 8) for p in prompts]


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_greedy_outputs_equal_full_recompute_with_the_cache_on(
    make_engine, shared_prefix_workload, batch
) -> None:
    prompts, refs = shared_prefix_workload
    engine = make_engine(num_blocks=256, block_size=8, max_num_seqs=batch, max_batch_tokens=128)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    bad = [i for i, (out, ref) in enumerate(zip(outs, refs, strict=True)) if out != ref]
    assert not bad, f"prompts {bad} differ at batch {batch}"
    stats = engine.stats()
    # every prompt past the first admissions finds a shared prefix; the second turns find whole turns
    assert stats.num_cache_hit_tokens > stats.num_cache_query_tokens // 4, stats


def test_second_turns_reuse_the_first_turns_prompt_and_answer(make_engine, shared_prefix_workload) -> None:
    prompts, refs = shared_prefix_workload
    engine = make_engine(num_blocks=256, block_size=8)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for first, second in zip(range(6), range(26, 32), strict=True):
        assert engine.generate([prompts[first]], params)[0] == refs[first]
        hits = engine.stats().num_cache_hit_tokens
        assert engine.generate([prompts[second]], params)[0] == refs[second]
        # the first turn's whole prompt and 7 of its 8 answer tokens have KV (the last was never fed)
        reused = engine.stats().num_cache_hit_tokens - hits
        assert reused == (len(prompts[first]) + 7) // 8 * 8, (first, reused)


def test_evictions_and_preemptions_keep_outputs_exact(make_engine, shared_prefix_workload) -> None:
    prompts, refs = shared_prefix_workload
    # 40 usable blocks of 4 tokens for a 16-wide batch: requests are preempted, cached blocks evicted
    engine = make_engine(num_blocks=41, block_size=4, max_num_seqs=16, max_batch_tokens=128)
    preempted = count_preemptions(engine)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert outs == refs
    stats = engine.stats()
    assert preempted[0] > 0 and stats.num_cache_evictions > 0 and stats.num_cache_hit_tokens > 0, stats
