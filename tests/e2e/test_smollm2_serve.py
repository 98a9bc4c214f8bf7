"""`kvrelay serve --model smollm2` (disaggregated, KV relayed over NIXL) against transformers.

The official openai client talks to the router; the prefill worker computes the prompt and the
first token, the decode worker reads the prompt's KV over NIXL and streams the rest. Greedy text
must equal transformers' greedy text (near-ties per shared/notes/token-equality.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from serve_helpers import ServeProcess, run_serve
from smollm2_reference import CHAT_PROMPTS, FACTUAL_QUESTIONS, NEAR_TIE_FP32, Greedy, chat_ids, hf_greedy

pytestmark = pytest.mark.e2e

MAX_NEAR_TIES = 2  # of 16 prompts, per the token-equality note


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServeProcess]:
    args = ["--model", "smollm2", "--prefill", "1", "--decode", "1", "--kv-backend", "nixl"]
    with run_serve(args, tmp_path_factory.mktemp("logs")) as s:
        yield s
    assert s.leftovers == [], f"workers left running after serve stopped: {s.leftovers}"


def _first_divergence(tokenizer: Any, reference: Greedy, text: str) -> int | None:
    """The first reference step whose text is not a prefix of ``text`` (None: all of it is)."""
    for step in range(len(reference.tokens)):
        if not text.startswith(tokenizer.decode(reference.tokens[: step + 1], skip_special_tokens=True)):
            return step
    return None


async def _chat(client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int, **extra: Any) -> str:
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        **extra,
    )
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])


async def test_16_concurrent_chat_streams_equal_transformers_greedy(
    serve: ServeProcess, hf_smollm2: Any, chat_references: dict[str, Any]
) -> None:
    """16 streams at once, 64 greedy tokens each (EOS ignored), every text == transformers'."""
    _, tokenizer = hf_smollm2
    client = openai.AsyncOpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=300)
    texts = await asyncio.wait_for(
        asyncio.gather(
            *(_chat(client, serve.model, p, 64, extra_body={"ignore_eos": True}) for p in CHAT_PROMPTS)
        ),
        timeout=300,
    )
    identical, near_ties, bad = 0, [], []
    for prompt, text in zip(CHAT_PROMPTS, texts, strict=True):
        reference: Greedy = chat_references[prompt][1]
        want = tokenizer.decode(reference.tokens, skip_special_tokens=True)
        if text == want:
            identical += 1
            continue
        step = _first_divergence(tokenizer, reference, text)
        if step is not None and reference.margins[step] < NEAR_TIE_FP32:
            near_ties.append((prompt, step))
        else:
            bad.append((prompt, step, text, want))
    print(f"{identical}/16 identical, near-ties {near_ties}")
    assert not bad, bad
    assert len(near_ties) <= MAX_NEAR_TIES, near_ties


async def test_factual_answers_equal_transformers(serve: ServeProcess, hf_smollm2: Any) -> None:
    """12 questions with known answers: transformers' greedy answer has the word; kvrelay's is identical."""
    model, tokenizer = hf_smollm2
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    wants = []
    for question, word in FACTUAL_QUESTIONS:
        tokens = hf_greedy(model, chat_ids(tokenizer, question), 48, stop_token=eos).tokens
        answer = tokenizer.decode(tokens[:-1] if tokens[-1] == eos else tokens)
        assert word.lower() in answer.lower(), (question, answer)  # the reference itself is right
        wants.append(answer)
    client = openai.AsyncOpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=300)
    got = await asyncio.wait_for(
        asyncio.gather(*(_chat(client, serve.model, q, 48) for q, _ in FACTUAL_QUESTIONS)), timeout=300
    )
    for (question, _), answer, want in zip(FACTUAL_QUESTIONS, got, wants, strict=True):
        assert answer == want, question
    print("\n".join(f"{q} -> {a}" for (q, _), a in zip(FACTUAL_QUESTIONS, got, strict=True)))
