"""Greedy tokens from the engine (paged cache, batching, chunking, preemption) == full recompute."""

from __future__ import annotations

import random

import pytest
from engine_testing import count_preemptions
from kvrelay_worker.engine import SamplingParams
from kvrelay_worker.model import LlamaForCausalLM

NUM_PROMPTS = 32
MAX_NEW = 12


@pytest.fixture(scope="module")
def prompts_and_refs(
    tiny_model: LlamaForCausalLM, reference
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    rng = random.Random(1234)
    vocab = tiny_model.config.vocab_size
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(1, 70))] for _ in range(NUM_PROMPTS)]
    max_tokens = [rng.randint(2, MAX_NEW) for _ in range(NUM_PROMPTS)]  # requests leave at different steps
    refs = [reference(p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    return prompts, refs, max_tokens


@pytest.mark.parametrize("batch", [1, 2, 7, 16, 32])
def test_engine_matches_full_recompute(make_engine, prompts_and_refs, batch: int) -> None:
    prompts, refs, max_tokens = prompts_and_refs
    engine = make_engine(num_blocks=256, block_size=8, max_num_seqs=batch, max_batch_tokens=256)
    params = [SamplingParams(max_tokens=n) for n in max_tokens]
    outs = engine.generate(prompts, params)
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert out == ref, f"prompt {i} (len {len(prompts[i])}) diverged at batch {batch}"
    assert sum(len(o) for o in outs) > 2 * NUM_PROMPTS  # outputs are multi-token


def test_chunked_prefill_and_staggered_arrivals(make_engine, prompts_and_refs) -> None:
    """Tiny token budget forces chunked prompts mixed with decodes; a new request joins every step."""
    prompts, refs, max_tokens = prompts_and_refs
    engine = make_engine(num_blocks=256, block_size=4, max_num_seqs=8, max_batch_tokens=24)
    results: dict[str, list[int]] = {}
    pending = list(range(NUM_PROMPTS))
    steps = 0
    while pending or engine.has_work():
        if pending:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], SamplingParams(max_tokens=max_tokens[i]), now=float(steps))
            results[str(i)] = []
        for o in engine.step(now=float(steps)).outputs:
            results[o.request_id].extend(o.new_token_ids)
        steps += 1
    for i in range(NUM_PROMPTS):
        assert results[str(i)] == refs[i], f"prompt {i} diverged"


def test_preemption_under_block_pressure_keeps_tokens_exact(make_engine, prompts_and_refs) -> None:
    prompts, refs, max_tokens = prompts_and_refs
    # 40 usable blocks of 4 tokens: the 16-wide batch cannot all fit, so requests are preempted.
    engine = make_engine(num_blocks=41, block_size=4, max_num_seqs=16, max_batch_tokens=128)
    preempted = count_preemptions(engine)
    outs = engine.generate(prompts[:20], [SamplingParams(max_tokens=n) for n in max_tokens[:20]])
    assert preempted[0] > 0
    assert outs == refs[:20]
