"""`kvrelay serve` (real router + prefill + decode processes, real KV relay) with the official openai client.

Greedy outputs must equal the single-process engine's; malformed and unsupported requests get OpenAI
errors naming the param, and serving goes on; 32 concurrent streams all finish correctly; stopping serve
leaves no worker behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from kvrelay_worker.model_store import ensure_tiny_model
from kvrelay_worker.tokenizer import Tokenizer
from logprob_checks import check_position, ids_by_bytes, ids_by_name
from serve_helpers import WORKER_RE, ServeProcess, run_serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServeProcess]:
    with run_serve(
        # two prefill workers: prefix-aware routing has a choice to make
        ["--model", "tiny", "--prefill", "2", "--decode", "1"],
        tmp_path_factory.mktemp("logs"),
    ) as s:
        yield s
    assert s.proc.returncode in (0, 130, -15), "\n".join(s.output[-20:])
    assert s.leftovers == [], f"workers left running after serve stopped: {s.leftovers}"
    assert any("stopped" in line for line in s.output[-5:])


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir: Path):  # type: ignore[no-untyped-def]
    """The single-process engine (no router, no KV relay, no prefix cache): the served stack, with its
    prefix caches and prefix-aware routing on, must match it."""
    from kvrelay_worker.engine.core import Engine, EngineConfig

    return Engine.from_dir(model_dir, EngineConfig(enable_prefix_caching=False))


@pytest.fixture(scope="module")
def reference(engine, tokenizer: Tokenizer):  # type: ignore[no-untyped-def]
    """Greedy text from the single-process engine for given prompt ids."""
    from kvrelay_worker.engine.sampling_params import SamplingParams

    def run(prompts: list[list[int]], max_tokens: int) -> list[str]:
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [tokenizer.decode(o) for o in outs]

    return run


@pytest.fixture
def client(serve: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=60)


def test_completions_greedy_equals_engine(
    client: openai.OpenAI, serve: ServeProcess, tokenizer, reference
) -> None:  # type: ignore[no-untyped-def]
    prompt = "The relay carries the memory of a prompt"
    want = reference([tokenizer.encode(prompt)], 24)[0]
    reply = client.completions.create(model=serve.model, prompt=prompt, max_tokens=24, temperature=0)
    assert reply.choices[0].text == want
    assert reply.usage is not None and reply.usage.completion_tokens == 24
    stream = client.completions.create(
        model=serve.model, prompt=prompt, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_completions_batch_equals_single_requests_and_engine(
    client: openai.OpenAI, serve: ServeProcess, tokenizer, reference
) -> None:  # type: ignore[no-untyped-def]
    """A list of prompts (strings, or token-id arrays): choice i is prompt i's own greedy completion."""
    texts = ["The relay carries the memory", "Once upon a time", "Numbers such as 7 appear"]
    for prompts in (texts, [tokenizer.encode("the station is"), tokenizer.encode("a quiet morning")]):
        ids = [p if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
        want = reference(ids, 12)
        single = [
            client.completions.create(model=serve.model, prompt=p, max_tokens=12, temperature=0)
            .choices[0]
            .text
            for p in prompts
        ]
        assert single == want
        reply = client.completions.create(model=serve.model, prompt=prompts, max_tokens=12, temperature=0)
        assert [c.index for c in reply.choices] == list(range(len(prompts)))
        assert [c.text for c in reply.choices] == want
        assert reply.usage is not None and reply.usage.prompt_tokens == sum(len(i) for i in ids)
        assert reply.usage.completion_tokens == 12 * len(prompts)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        stream = client.completions.create(
            model=serve.model, prompt=prompts, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        streamed = ["" for _ in prompts]
        for chunk in chunks[:-1]:
            (choice,) = chunk.choices
            streamed[choice.index] += choice.text
        assert streamed == want
        assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage


def test_completions_batch_bad_prompt_or_too_many_is_a_400(serve: ServeProcess) -> None:
    url = serve.base_url + "/completions"
    for prompt, message in (
        (["fine", "also fine", ""], "prompt 2: "),
        ([[5, 6], [0, 100000]], "prompt 1: "),
        (["hi"] * 65, "at most 64 choices"),
    ):
        resp = httpx.post(url, json={"model": serve.model, "prompt": prompt, "max_tokens": 2}, timeout=30)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["param"], error["code"]) == ("prompt", "invalid_value") and message in error["message"]


def test_chat_greedy_equals_engine(client: openai.OpenAI, serve: ServeProcess, tokenizer, reference) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "where is the station?"}]
    want = reference([tokenizer.encode_chat(messages)], 20)[0]
    reply = client.chat.completions.create(model=serve.model, messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == want
    stream = client.chat.completions.create(
        model=serve.model, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


PENALIZED = [
    {"presence_penalty": 1.5, "frequency_penalty": 0.5},
    {"extra_body": {"repetition_penalty": 1.8}},
    {"logit_bias": {"7": 100}, "extra_body": {"ignore_eos": True}},
    {"temperature": 1.0, "seed": 11, "frequency_penalty": 2.0, "extra_body": {"repetition_penalty": 1.3}},
]


@pytest.mark.parametrize(
    "fields", PENALIZED, ids=["presence-frequency", "repetition", "logit-bias", "seeded"]
)
def test_penalties_and_bias_through_the_relay_equal_the_engine(
    client: openai.OpenAI, serve: ServeProcess, tokenizer: Tokenizer, model_dir: Path, fields: dict[str, Any]
) -> None:
    """Penalties and logit_bias through router, prefill, KV relay and decode give the single-process
    engine's tokens for the same SamplingParams (and differ from the plain run: they did something)."""
    from kvrelay_worker.engine.core import Engine, EngineConfig
    from kvrelay_worker.engine.sampling_params import SamplingParams

    prompt, max_tokens = "one two one two one two", 24
    extra = fields.get("extra_body", {})
    given = {k: v for k, v in fields.items() if k != "extra_body"}
    reply = client.completions.create(
        model=serve.model,
        prompt=prompt,
        max_tokens=max_tokens,
        **{"temperature": 0, **given},
        extra_body=extra,
    )
    engine = Engine.from_dir(model_dir, EngineConfig())
    bias = {int(k): v for k, v in given.pop("logit_bias", {}).items()}
    params = SamplingParams(
        max_tokens=max_tokens, **{"temperature": 0.0, **given}, **extra, logit_bias=bias,
        stop_token_ids=[] if extra.get("ignore_eos") else tokenizer.eos_token_ids,
    )  # fmt: skip
    ids = tokenizer.encode(prompt)
    (want,) = engine.generate([ids], params)
    (plain,) = engine.generate([ids], params.model_copy(update={
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {},
    }))  # fmt: skip
    assert want != plain, "the transform changed nothing: the test would not see it ignored"
    assert reply.choices[0].text == tokenizer.decode(want)
    if bias:
        assert set(want) == {7}  # +100 makes token 7 the only choice


def test_min_tokens_holds_off_the_stop_string(client: openai.OpenAI, serve: ServeProcess) -> None:
    """A stop string found before min_tokens tokens does not end the request (vLLM's semantics)."""
    prompt = "The relay carries the memory of a prompt"
    free = client.completions.create(model=serve.model, prompt=prompt, max_tokens=16, temperature=0)
    stop = free.choices[0].text.strip()[:2]  # occurs in the first token or two
    assert stop, free
    stopped = client.completions.create(
        model=serve.model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    held = client.completions.create(
        model=serve.model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
        extra_body={"min_tokens": 12},
    )  # fmt: skip
    assert held.usage is not None and held.usage.completion_tokens >= 12, held
    assert stop in held.choices[0].text and free.choices[0].text.startswith(held.choices[0].text), held


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, serve: ServeProcess) -> None:
    def once() -> str:
        reply = client.completions.create(
            model=serve.model, prompt="Clouds drift", max_tokens=16, temperature=0.9, top_p=0.9, seed=1234
        )
        return reply.choices[0].text

    assert once() == once()


# --- logprobs: the API's against log_softmax of the engine's own logits ---------------------------------
# Reference: one dense fp32 forward of the whole sequence (`full_forward_logits`); the API's come from a
# paged prefill, the relayed KV and decode steps over the same weights, so they differ by float rounding
# in a different order of operations only (measured on these prompts: printed by the tests, ~1e-6).
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def log_softmax(engine):  # type: ignore[no-untyped-def]
    """ids -> [T, V]: log_softmax of the engine model's logits at every position (one dense forward)."""
    import torch

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = engine.model.full_forward_logits(torch.tensor([ids]))[0].float()
        return torch.log_softmax(logits, dim=-1)

    return run


def test_chat_logprobs_equal_the_engine(
    client: openai.OpenAI, serve: ServeProcess, tokenizer, log_softmax
) -> None:  # type: ignore[no-untyped-def]
    """Greedy chat with logprobs and top_logprobs=5, streamed and not: every generated token's logprob
    and its 5 alternatives are the engine's log_softmax; `bytes` spell the text."""
    messages = [{"role": "user", "content": "where is the station?"}]
    prompt = tokenizer.encode_chat(messages)
    ids_of = ids_by_bytes(tokenizer)
    kwargs: dict[str, Any] = {
        "model": serve.model, "messages": messages, "max_tokens": 20, "temperature": 0,
        "logprobs": True, "top_logprobs": 5,
    }  # fmt: skip
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    generated = [ids_of[bytes(e.bytes)] for e in content]
    assert reply.usage is not None and len(generated) == reply.usage.completion_tokens
    text = b"".join(
        bytes(e.bytes) for e, t in zip(content, generated, strict=True) if not tokenizer.is_special(t)
    )
    assert text.decode("utf-8", "replace") == reply.choices[0].message.content
    rows = log_softmax(prompt + generated)
    worst = 0.0
    for i, (token, entry) in enumerate(zip(generated, content, strict=True)):
        row = rows[len(prompt) - 1 + i]
        assert float(row[token]) >= float(row.max()) - 2 * LOGPROB_TOL  # greedy: the argmax
        top = [(ids_of[bytes(t.bytes)], t.logprob) for t in entry.top_logprobs]
        worst = max(worst, check_position(row, token, entry.logprob, top, 5, LOGPROB_TOL))
    stream = client.chat.completions.create(**kwargs, stream=True)
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [bytes(e.bytes) for e in streamed] == [bytes(e.bytes) for e in content]
    for a, b in zip(streamed, content, strict=True):
        assert abs(a.logprob - b.logprob) <= LOGPROB_TOL
    print(f"chat: {len(generated)} tokens, largest logprob difference from the engine {worst:.2g}")


def test_completion_logprobs_and_echo_equal_the_engine(
    client: openai.OpenAI, serve: ServeProcess, tokenizer, log_softmax
) -> None:  # type: ignore[no-untyped-def]
    """Completions with logprobs=3, echo or not, streamed or not: the prompt's tokens (echo; the first
    with null) and the completion's, each with the engine's logprob and top 3 (+ the token itself)."""
    prompt = "The relay carries the memory of a prompt"
    ids = tokenizer.encode(prompt)
    ids_of = ids_by_name(tokenizer)
    kwargs: dict[str, Any] = {"model": serve.model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    reply = client.completions.create(**kwargs, logprobs=3, echo=True)
    choice, lp = reply.choices[0], reply.choices[0].logprobs
    everything = [ids_of[name] for name in lp.tokens]
    assert everything[: len(ids)] == ids and reply.usage is not None
    assert len(everything) == len(ids) + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens == len(ids)
    assert choice.text.startswith(prompt) and lp.text_offset[len(ids)] == len(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    rows = log_softmax(everything)
    worst = 0.0
    for i in range(1, len(everything)):
        token, top = everything[i], [(ids_of[name], v) for name, v in lp.top_logprobs[i].items()]
        alternatives = top[:3]  # the token itself comes last when it is not among them
        assert len(top) == 3 or (len(top) == 4 and top[3][0] == token), top
        worst = max(
            worst, check_position(rows[i - 1], token, lp.token_logprobs[i], alternatives, 3, LOGPROB_TOL)
        )
    plain = client.completions.create(**kwargs, logprobs=3)
    assert plain.choices[0].text == choice.text[len(prompt) :]
    assert plain.choices[0].logprobs.tokens == lp.tokens[len(ids) :]
    assert plain.choices[0].logprobs.text_offset == lp.text_offset[len(ids) :]
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(
        lp.token_logprobs[len(ids) :], abs=LOGPROB_TOL
    )
    chunks = list(client.completions.create(**kwargs, logprobs=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    print(f"completion: {len(everything)} tokens, largest logprob difference from the engine {worst:.2g}")


def test_echo_with_max_tokens_zero_scores_the_prompt(
    client: openai.OpenAI, serve: ServeProcess, tokenizer, log_softmax
) -> None:  # type: ignore[no-untyped-def]
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs=1, max_tokens=0): the prompt
    alone with its logprobs, nothing generated, no decode call, no KV left held on the prefill worker."""
    context = tokenizer.encode("Trains leave the station on time because")
    continuation = tokenizer.encode(" the drivers are careful", add_special_tokens=False)
    ids = context + continuation
    # Earlier requests may still hold KV there (one a stop string ended at its first token leaves its
    # handle unclaimed until the lease expires), so: no more than before.
    held_before = _worker_metric(serve, "prefill", "kvrelay_kv_cache_usage_ratio")
    decoded_before = _worker_metric(serve, "decode", "kvrelay_generation_tokens_total")
    for stream in (False, True):
        kwargs: dict[str, Any] = {
            "model": serve.model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1,
            "temperature": 0,
        }  # fmt: skip
        if stream:
            chunks = list(client.completions.create(**kwargs, stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            lp = chunks[0].choices[0].logprobs
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            reply = client.completions.create(**kwargs)
            text, lp = reply.choices[0].text, reply.choices[0].logprobs
            assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
                len(ids), 0,
            )  # fmt: skip
        assert text == tokenizer.decode(ids) and len(lp.tokens) == len(ids)
        rows = log_softmax(ids)
        want = [float(rows[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=LOGPROB_TOL)
        # the harness's score: the continuation's summed logprobs, and whether each token was the argmax
        score = sum(lp.token_logprobs[len(context) :])
        assert score == pytest.approx(sum(want[len(context) - 1 :]), abs=LOGPROB_TOL * len(continuation))
        greedy = all(
            t == max(top.values())
            for t, top in zip(lp.token_logprobs[len(context) :], lp.top_logprobs[len(context) :], strict=True)
        )
        want_greedy = all(int(rows[i - 1].argmax()) == ids[i] for i in range(len(context), len(ids)))
        assert greedy == want_greedy
        # the max_tokens 1 prefill ended at its first token: its KV is freed, not held for a reader
        assert _worker_metric(serve, "prefill", "kvrelay_kv_cache_usage_ratio") <= held_before
    assert _worker_metric(serve, "decode", "kvrelay_generation_tokens_total") == decoded_before


async def test_32_concurrent_streams(serve: ServeProcess, tokenizer, reference) -> None:  # type: ignore[no-untyped-def]
    prompts = [f"Numbers such as {i} appear in logs, question {i * 7}" for i in range(32)]
    wants = reference([tokenizer.encode(p) for p in prompts], 16)
    client = openai.AsyncOpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=120)

    async def one(prompt: str) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=serve.model, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 180)
    finally:
        await client.close()
    assert [r[0] for r in results] == wants
    assert all(r[1] == "length" for r in results)


USER = [{"role": "user", "content": "hi"}]
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
IMAGE = {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}
TOOL = {"type": "function", "function": {"name": "f"}}
ASSISTANT_CALL = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
TOOL_ANSWER = {"role": "tool", "content": "4", "tool_call_id": "c1"}
OBJEKT = {"type": "objekt"}  # not a JSON Schema type
BAD_ARGS = {**TOOL_CALL, "function": {"name": "f", "arguments": "not json"}}
BadBody = tuple[str, bytes | dict[str, object]]


def comp(**fields: object) -> BadBody:
    """A /completions body: a valid one with `fields` over it."""
    return "/completions", {"model": "tiny", "prompt": "hi", **fields}


def chat(**fields: object) -> BadBody:
    return "/chat/completions", {"model": "tiny", "messages": USER, **fields}


# (path, body, status, param, code), sent as raw HTTP, so wrong JSON types and broken bodies reach the router
# as they are. The tiny model's context is 2048 tokens. None for param: the error names none; for code: any.
MALFORMED: list[tuple[str, bytes | dict[str, object], int, str | None, str | None]] = [
    ("/completions", b'{"model": "tiny", "prompt": ', 400, None, "invalid_json"),
    ("/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, None, "invalid_json"),
    ("/completions", b"", 400, None, "invalid_json"),
    ("/completions", b"null", 400, None, None),
    ("/completions", {"model": "tiny"}, 400, "prompt", "missing_required_parameter"),
    (*comp(model="gpt-4"), 404, "model", "model_not_found"),
    (*chat(model="tiny-2"), 404, "model", "model_not_found"),
    (*comp(prompt=[]), 400, "prompt", "invalid_value"),
    (*comp(prompt=[0, 100000]), 400, "prompt", "invalid_value"),
    (*comp(prompt="hi " * 2100), 400, "prompt", "context_length_exceeded"),
    (*chat(messages=[{"role": "user", "content": "hi " * 2100}]), 400, "messages", "context_length_exceeded"),
    (*comp(max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
    (*chat(max_completion_tokens=5000), 400, "max_completion_tokens", "context_length_exceeded"),
    (*comp(max_tokens=-1), 400, "max_tokens", "invalid_value"),
    (*comp(max_tokens=True), 400, "max_tokens", "invalid_type"),
    (*comp(temperature=-0.5), 400, "temperature", "invalid_value"),
    (*comp(temperature="0.7"), 400, "temperature", "invalid_type"),
    (*comp(top_p=2), 400, "top_p", "invalid_value"),
    (*comp(n=17), 400, "n", "invalid_value"),  # MAX_N
    (*comp(n=0), 400, "n", "invalid_value"),
    (*comp(prompt=["a"] * 9, n=8), 400, "prompt", "invalid_value"),  # 72 choices > MAX_PROMPTS
    (*comp(n="2"), 400, "n", "invalid_type"),
    (*comp(n=2.0), 400, "n", "invalid_type"),
    (*comp(logprobs=6), 400, "logprobs", "invalid_value"),
    (*comp(max_tokens=0), 400, "max_tokens", "invalid_value"),  # 0 only with echo
    (*comp(ignore_eos="true"), 400, "ignore_eos", "invalid_type"),
    (*comp(min_tokens=40, max_tokens=8), 400, "min_tokens", "invalid_value"),
    (*comp(use_beam_search=True), 400, "use_beam_search", "unknown_parameter"),
    (*comp(stream_options={"include_usage": True}), 400, "stream_options", "invalid_value"),
    (*comp(stream=True, stream_options={"continuous_usage_stats": True}), 400,
     "stream_options.continuous_usage_stats", "invalid_value"),  # needs include_usage
    (*chat(messages="hi"), 400, "messages", "invalid_type"),
    (*chat(messages=[]), 400, "messages", None),
    (*chat(messages=[{"content": "no role"}]), 400, "messages.0.role", "missing_required_parameter"),
    (*chat(messages=[{"role": "user"}]), 400, "messages.0.content", "missing_required_parameter"),
    (*chat(messages=[{"role": "system", "content": None}, *USER]), 400, "messages.0.content", None),
    (*chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content", "invalid_type"),
    (*chat(messages=[{"role": "user", "content": [IMAGE]}]), 400, "messages.0.content", "unsupported_value"),
    # an assistant call never answered by a tool message
    (*chat(messages=[*USER, {"role": "assistant", "tool_calls": [TOOL_CALL]}]),
     400, "messages.1.tool_calls", None),
    # a tool message answering no earlier call, or naming none
    (*chat(messages=[*USER, {"role": "tool", "content": "4", "tool_call_id": "c1"}]),
     400, "messages.1.tool_call_id", None),
    (*chat(messages=[*USER, ASSISTANT_CALL, {"role": "tool", "content": "4"}]),
     400, "messages.2.tool_call_id", None),
    (*chat(messages=[*USER, {**ASSISTANT_CALL, "tool_calls": [BAD_ARGS]}, TOOL_ANSWER]), 400,
     "messages.1.tool_calls.0.function.arguments", "invalid_value"),
    (*chat(messages=[{"role": "function", "content": "x"}]), 400, "messages.0.role", "unsupported_value"),
    (*chat(messages=[{"role": "user", "content": "x", "tool_calls": [TOOL_CALL]}]),
     400, "messages.0.tool_calls", None),
    (*chat(messages=[{"role": "user", "content": "hi", "name": "ann"}]), 400, "messages.0.name", None),
    (*chat(stream="yes"), 400, "stream", "invalid_type"),
    (*chat(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage", None),
    (*chat(stop=["1", "2", "3", "4", "5"]), 400, "stop", "invalid_value"),
    (*chat(n="2"), 400, "n", "invalid_type"),
    (*chat(seed="1"), 400, "seed", "invalid_type"),
    (*chat(response_format="json"), 400, "response_format", "invalid_type"),
    (*chat(response_format={"type": "yaml"}), 400, "response_format.type", "invalid_value"),
    (*chat(response_format={"type": "json_schema"}),
     400, "response_format.json_schema", "missing_required_parameter"),
    (*chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), 400,
     "response_format.json_schema.name", "missing_required_parameter"),
    (*chat(response_format={"type": "json_schema", "json_schema": {"name": "a b"}}), 400,
     "response_format.json_schema.name", "invalid_value"),
    (*chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": OBJEKT}}), 400,
     "response_format.json_schema.schema", "invalid_value"),
    (*chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "x": 1}}), 400,
     "response_format.json_schema.x", "unknown_parameter"),
    (*chat(response_format={"type": "json_object"}, ignore_eos=True), 400, "ignore_eos", "invalid_value"),
    (*comp(response_format={"type": "json_object"}), 400, "response_format", "unknown_parameter"),
    (*chat(structured_outputs={"regex": "a["}), 400, "structured_outputs.regex", "invalid_value"),
    (*chat(structured_outputs={"regex": "a", "choice": ["a"]}), 400, "structured_outputs", "invalid_value"),
    (*chat(structured_outputs={"jsonpath": "$"}), 400, "structured_outputs.jsonpath", "unknown_parameter"),
    (*comp(structured_outputs={"grammar": "start: undefined_rule"}),
     400, "structured_outputs.grammar", "invalid_value"),
    (*comp(structured_outputs={"choice": []}), 400, "structured_outputs.choice", "invalid_type"),
    (*chat(tool_choice="auto"), 400, "tool_choice", "invalid_value"),  # no tools
    (*chat(tools=[TOOL], tool_choice="sometimes"), 400, "tool_choice", "invalid_value"),
    (*chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}), 400,
     "tool_choice.function.name", "invalid_value"),  # an unknown tool
    (*chat(tools=[{"type": "retrieval"}]), 400, "tools.0", "invalid_value"),
    (*chat(tools=[TOOL, TOOL]), 400, "tools.1.function.name", "invalid_value"),  # defined twice
    (*chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     400, "tools.0.function.name", None),
    (*chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), 400,
     "tools.0.function.parameters", "invalid_value"),
    (*chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": 3}}}]), 400,
     "tools.0.function.parameters", "invalid_value"),  # not a JSON Schema
    (*chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}), 400,
     "response_format", "invalid_value"),
    (*chat(tools=[TOOL], parallel_tool_calls="no"), 400, "parallel_tool_calls", "invalid_type"),
    (*chat(logit_bias={"100000": 10}), 400, "logit_bias", "invalid_value"),  # outside the vocabulary
    (*chat(logit_bias={"5": 101}), 400, "logit_bias", "invalid_value"),
    (*chat(presence_penalty=2.5), 400, "presence_penalty", "invalid_value"),
    (*chat(stop_token_ids=[1, "2"]), 400, "stop_token_ids.1", "invalid_type"),
    (*chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),  # only with logprobs=true
    (*chat(repetition_penalty=0), 400, "repetition_penalty", "invalid_value"),
    (*chat(reasoning_effort="high"), 400, "reasoning_effort", "unsupported_value"),
    (*chat(audio={"voice": "alloy", "format": "wav"}), 400, "audio", "unsupported_parameter"),
    (*chat(foo=1), 400, "foo", "unknown_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    MALFORMED,
    ids=[f"{i}-{m[3] or m[4]}" for i, m in enumerate(MALFORMED)],
)
def test_malformed_request_gets_an_openai_error(
    serve: ServeProcess,
    path: str,
    body: bytes | dict[str, object],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=serve.base_url, timeout=30) as http:
        resp = http.post(path, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    if param is not None:
        assert param in error["message"] or status == 404 or error["code"] == "context_length_exceeded", error
    if code is not None:
        assert error["code"] == code, error


# The official client: the same refusals come back as its exception types, naming the param.
SDK_REFUSED: list[tuple[str, dict[str, Any], type[openai.APIStatusError], str | None]] = [
    ("completions", {"n": 17}, openai.BadRequestError, "n"),
    ("completions", {"max_tokens": 4096}, openai.BadRequestError, "max_tokens"),
    ("completions", {"model": "nope"}, openai.NotFoundError, "model"),
    ("completions", {"stream": True, "presence_penalty": 3.0}, openai.BadRequestError, "presence_penalty"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": OBJEKT}}},
     openai.BadRequestError, "response_format.json_schema.schema"),
    ("chat", {"stream": True, "logit_bias": {"x": 10}}, openai.BadRequestError, "logit_bias"),
    ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     openai.BadRequestError, "tool_choice.function.name"),
    ("chat", {"messages": [{"role": "user"}]}, openai.BadRequestError, "messages.0.content"),
    ("chat", {"extra_body": {"min_tokens": -1}}, openai.BadRequestError, "min_tokens"),
    ("chat", {"extra_body": {"ignore_eos": "yes"}}, openai.BadRequestError, "ignore_eos"),
    ("chat", {"top_logprobs": 2}, openai.BadRequestError, "top_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "kwargs", "error", "param"), SDK_REFUSED, ids=[f"{k}-{p}" for k, _, _, p in SDK_REFUSED]
)
def test_openai_client_gets_refusals_naming_the_param(
    client: openai.OpenAI,
    serve: ServeProcess,
    kind: str,
    kwargs: dict[str, Any],
    error: type[openai.APIStatusError],
    param: str | None,
) -> None:
    kwargs = {"model": serve.model, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        if kind == "chat":
            client.chat.completions.create(**{"messages": USER, **kwargs})
        else:
            client.completions.create(**{"prompt": "hi", **kwargs})
    assert info.value.param == param, info.value.body
    assert info.value.type == "invalid_request_error"


def test_default_forms_of_unsupported_parameters_work(client: openai.OpenAI, serve: ServeProcess) -> None:
    """What SDKs and harnesses send by default (n=1, logprobs=false, penalties 0...) is served."""
    reply = client.chat.completions.create(
        model=serve.model, messages=USER, max_tokens=4, max_completion_tokens=4, n=1, logprobs=False,
        presence_penalty=0, frequency_penalty=0, logit_bias={}, response_format={"type": "text"},
        tool_choice="none", seed=None, user="tester", temperature=1, stream=False,
        extra_body={"ignore_eos": True, "top_k": 5},
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "length" and reply.usage is not None
    assert reply.usage.completion_tokens == 4
    text_parts = [{"type": "text", "text": "where is "}, {"type": "text", "text": "the station?"}]
    reply = client.chat.completions.create(
        model=serve.model, messages=[{"role": "user", "content": text_parts}], max_tokens=4, temperature=0
    )
    plain = client.chat.completions.create(
        model=serve.model,
        messages=[{"role": "user", "content": "where is the station?"}],
        max_tokens=4,
        temperature=0,
    )
    assert reply.choices[0].message.content == plain.choices[0].message.content
    reply = client.completions.create(
        model=serve.model, prompt="hi", max_tokens=3, n=1, best_of=1, echo=False, logprobs=None, suffix=None
    )
    assert reply.choices[0].finish_reason == "length"


def test_serving_goes_on_after_malformed_requests(client: openai.OpenAI, serve: ServeProcess) -> None:
    """Runs after the malformed-request tests above (file order): the stack still answers normally."""
    with httpx.Client(timeout=30) as http:
        assert http.get(serve.base_url.removesuffix("/v1") + "/health").status_code == 200
    reply = client.completions.create(model=serve.model, prompt="still serving", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].text
    reply = client.chat.completions.create(model=serve.model, messages=USER, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content


def test_models_and_metrics(serve: ServeProcess) -> None:
    with httpx.Client(timeout=30) as http:
        models = http.get(serve.base_url + "/models").json()
        assert models["data"][0]["id"] == serve.model and models["data"][0]["max_model_len"] == 2048
        metrics = http.get(serve.base_url.removesuffix("/v1") + "/metrics").text
    for name in (
        "kvrelay_time_to_first_token_seconds_bucket",
        "kvrelay_inter_token_latency_seconds_bucket",
        'kvrelay_requests_total{model="tiny",status="success"}',
        "kvrelay_generation_tokens_total",
        "kvrelay_prompt_tokens_total",
    ):
        assert name in metrics


def _per_worker_metric(serve: ServeProcess, role: str, metric: str) -> dict[str, float]:
    """`metric` from each `role` worker's own /metrics, by worker name."""
    values = {}
    for line in serve.output:
        if (m := WORKER_RE.search(line)) and m.group(1).startswith(role):
            text = httpx.get(f"http://127.0.0.1:{m.group(4)}/metrics", timeout=10).text
            values[m.group(1)] = sum(
                float(row.rsplit(" ", 1)[1])
                for row in text.splitlines()
                if row.startswith(metric + "{") and f'role="{role}"' in row
            )
    return values


def _worker_metric(serve: ServeProcess, role: str, metric: str) -> float:
    """`metric` summed over the `role` workers' own /metrics."""
    return sum(_per_worker_metric(serve, role, metric).values())


def _router_metric(serve: ServeProcess, sample: str) -> float:
    text = httpx.get(serve.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(row.rsplit(" ", 1)[1]) for row in text.splitlines() if row.startswith(sample))


def test_a_conversation_reuses_its_prefix_on_the_prefill_worker_that_holds_it(
    client: openai.OpenAI, serve: ServeProcess, tokenizer, reference
) -> None:  # type: ignore[no-untyped-def]
    """Multi-turn chat over two prefill workers: each turn goes where the conversation's KV is cached,
    computes only what is new, and answers exactly as the engine without any cache does. The decode
    worker, which holds the last turn (its prompt relayed, its answer computed), reads only the rest."""
    hits = "kvrelay_prefix_cache_hits_total"
    routed_by_prefix = 'kvrelay_router_prefill_routing_total{model="tiny",reason="prefix"}'
    system = {"role": "system", "content": "You answer questions about trains, stations and timetables. " * 3}
    messages = [system, {"role": "user", "content": "When does the first train leave?"}]
    previous = 0  # the last turn's prompt length: its full blocks are cached where it was prefilled
    for turn in range(3):
        before = _per_worker_metric(serve, "prefill", hits)
        decode_before = _worker_metric(serve, "decode", hits)
        by_prefix = _router_metric(serve, routed_by_prefix)
        prompt = tokenizer.encode_chat(messages)
        want = reference([prompt], 12)[0]
        reply = client.chat.completions.create(
            model=serve.model, messages=messages, max_tokens=12, temperature=0
        )
        assert reply.choices[0].message.content == want, f"turn {turn}"
        gained = {name: v - before[name] for name, v in _per_worker_metric(serve, "prefill", hits).items()}
        if turn:  # one worker, routed there by prefix, found the last turn's prompt cached
            assert _router_metric(serve, routed_by_prefix) == by_prefix + 1
            assert min(gained.values()) == 0 and max(gained.values()) >= 16 * (previous // 16), gained
            # the one decode worker held the last turn's prompt: those blocks were not relayed again
            assert _worker_metric(serve, "decode", hits) - decode_before >= 16 * (previous // 16)
        previous = len(prompt)
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": f"And train number {turn + 2}?"},
        ]


def _decode_running(serve: ServeProcess) -> float:
    """`kvrelay_requests_running` summed over the decode workers' own /metrics."""
    return _worker_metric(serve, "decode", "kvrelay_requests_running")


def test_client_disconnect_frees_the_decode_worker(serve: ServeProcess) -> None:
    body = {"model": serve.model, "prompt": "Trains leave on time", "max_tokens": 1900, "stream": True}
    with (
        httpx.Client(base_url=serve.base_url, timeout=30) as http,
        http.stream("POST", "/completions", json=body) as resp,
    ):
        lines = resp.iter_lines()
        assert sum(1 for _, line in zip(range(40), lines, strict=False) if line.startswith("data:")) >= 3
        assert _decode_running(serve) == 1  # the request is decoding right now
    deadline = time.monotonic() + 10
    while _decode_running(serve) != 0:
        assert time.monotonic() < deadline, "the decode worker kept generating for a client that left"
        time.sleep(0.2)


def test_n_choices_are_seeded_per_choice_and_share_one_prefill(
    client: openai.OpenAI, serve: ServeProcess
) -> None:
    """n=4: choice j draws with seed + j (so it equals an n=1 request with that seed), the prompt is
    counted once in usage, and the followers find the leader's prompt blocks in the prefill cache."""
    hits = "kvrelay_prefix_cache_hits_total"
    prompt = "Timetables for the early trains and the late buses, " * 4
    probe = client.completions.create(model=serve.model, prompt=prompt, max_tokens=1)
    assert probe.usage is not None
    num_prompt = probe.usage.prompt_tokens
    before = _worker_metric(serve, "prefill", hits)
    reply = client.completions.create(
        model=serve.model, prompt=prompt, max_tokens=8, temperature=1.0, seed=40, n=4
    )
    gained = _worker_metric(serve, "prefill", hits) - before
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    assert len(set(texts)) > 1, texts  # four draws, not one answer four times
    singles = [
        client.completions.create(
            model=serve.model, prompt=prompt, max_tokens=8, temperature=1.0, seed=40 + j
        )
        .choices[0]
        .text
        for j in range(4)
    ]
    assert texts == singles
    assert reply.usage is not None and reply.usage.prompt_tokens == num_prompt
    assert reply.usage.completion_tokens == 4 * 8
    # the three followers each found the leader's full prompt blocks cached (16-token blocks)
    assert gained >= 3 * 16 * (num_prompt // 16), (gained, num_prompt)


def test_n_choices_stream_and_batch(client: openai.OpenAI, serve: ServeProcess) -> None:
    chunks = list(client.chat.completions.create(
        model=serve.model, messages=USER, max_tokens=6, temperature=1.0, seed=3, n=3, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 18
    whole = client.chat.completions.create(
        model=serve.model, messages=USER, max_tokens=6, temperature=1.0, seed=3, n=3
    )
    streamed = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(3)
    ]
    assert streamed == [c.message.content for c in whole.choices]
    # a batch of 2 prompts x n=2: choice i * n + j is prompt i's j-th
    batch = client.completions.create(
        model=serve.model, prompt=["one", "two"], max_tokens=4, temperature=1.0, seed=9, n=2
    )
    alone = [
        client.completions.create(model=serve.model, prompt=p, max_tokens=4, temperature=1.0, seed=9, n=2)
        for p in ("one", "two")
    ]
    assert [c.text for c in batch.choices] == [c.text for a in alone for c in a.choices]


def test_structured_output_on_the_tiny_model(client: openai.OpenAI, serve: ServeProcess) -> None:
    """A random-weight model writes gibberish; constrained, through prefill + relay + decode, it writes
    exactly what the grammar allows, streaming or not, with any seed."""
    import jsonschema

    properties = {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}}
    schema = {
        "type": "object",
        "properties": properties,
        "required": ["id", "ok"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    for seed in range(4):
        reply = client.chat.completions.create(
            model=serve.model,
            messages=USER,
            max_tokens=60,
            temperature=1.0,
            seed=seed,
            response_format=response_format,
        )
        assert reply.choices[0].finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    stream = client.completions.create(
        model=serve.model, prompt="hi", max_tokens=40, temperature=1.0, seed=5, stream=True,
        extra_body={"structured_outputs": {"regex": "[A-Z][a-z]{3,6}( [a-z]{2,5}){2}[.!]"}},
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in stream)
    assert re.fullmatch(r"[A-Z][a-z]{3,6}( [a-z]{2,5}){2}[.!]", text), text


def test_continuous_usage_stats_as_benchmark_clients_ask(serve: ServeProcess) -> None:
    """vLLM's `continuous_usage_stats` (GuideLLM sends it): usage on every chunk, counting up to the total."""
    body = {
        "model": serve.model, "prompt": "hi", "max_tokens": 12, "stream": True, "n": 2, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }  # fmt: skip
    with httpx.stream("POST", serve.base_url + "/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 24 and counts[0] < 24, counts


def test_responses_api_is_the_chat_path(client: openai.OpenAI, serve: ServeProcess) -> None:
    """/v1/responses with the official client: the same answer as the chat request it becomes, streamed
    or not, with the Response's usage, status and lifecycle events."""
    kwargs: dict[str, Any] = {"model": serve.model, "temperature": 0}
    chat = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}],
        max_tokens=12, **kwargs,
    )  # fmt: skip
    reply = client.responses.create(
        instructions="Be brief.", input="hi there", max_output_tokens=12, **kwargs
    )
    assert reply.output_text == chat.choices[0].message.content
    assert reply.usage is not None and chat.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat.usage.prompt_tokens, 12)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    parts = [{"type": "input_text", "text": "hi "}, {"type": "input_text", "text": "there"}]
    listed = client.responses.create(
        instructions="Be brief.", input=[{"role": "user", "content": parts}], max_output_tokens=12, **kwargs
    )
    assert listed.output_text == reply.output_text
    stream = client.responses.create(
        instructions="Be brief.", input="hi there", max_output_tokens=12, stream=True, **kwargs
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    done = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-4:] == [*done, "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == reply.output_text == events[-1].response.output_text


RESPONSES_MALFORMED: list[tuple[dict[str, Any], str, str]] = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_value"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0", "unsupported_value"),
    ({"input": [{"type": "web_search_call"}]}, "input.0.type", "unsupported_value"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input.0.role", "invalid_value"),
    # the answer to a call no earlier item made
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "4"}]}, "input.0",
     "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "unsupported_value"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools.0.name", "invalid_value"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}},
     "text.format.schema", "invalid_value"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "invalid_value"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"max_output_tokens": 5000}, "max_output_tokens", "context_length_exceeded"),
    ({"temperature": "hot"}, "temperature", "invalid_type"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"input": 5}, "input", "invalid_type"),
    ({"frequency_penalty": 1}, "frequency_penalty", "unknown_parameter"),  # not a Responses parameter
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "param", "code"), RESPONSES_MALFORMED, ids=[m[1] for m in RESPONSES_MALFORMED]
)
def test_malformed_responses_request_names_the_field(
    serve: ServeProcess, fields: dict[str, Any], param: str, code: str
) -> None:
    body = {"model": serve.model, "input": "hi", **fields}
    resp = httpx.post(serve.base_url + "/responses", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert param in error["message"] or code == "context_length_exceeded", error
    resp = httpx.get(serve.base_url + "/responses/resp_123", timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def _profile(serve: ServeProcess, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    command = [sys.executable, "-c", "from kvrelay_worker.cli import main; main()", "profile", "--url",
               serve.base_url, "--prompt-tokens", "64,256", "--contexts", "64", "--decode-tokens", "12",
               "--max-concurrency", "8", "--min-requests", "4", *extra]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_kvrelay_profile_measures_the_stack_and_writes_a_valid_patch(
    serve: ServeProcess, tmp_path: Path
) -> None:
    """`kvrelay profile` against the running stack (2 prefill workers, 1 decode): every level is measured
    through the API, the seeds are the worst length's best within-SLO figure per ready replica, and the
    patch is a valid spec.autoscaling.profile."""
    from kvrelay_operator import api

    out = tmp_path / "profile.yaml"
    code, stdout, stderr = _profile(serve, tmp_path, "--ttft-slo", "2", "--itl-slo", "0.5", "--out", str(out))
    assert code == 0, stderr
    result = json.loads(stdout.splitlines()[0])
    assert result["replicas"] == {"prefill": 2, "decode": 1}
    points = result["points"]
    assert {(p["role"], p["length"]) for p in points} == {("prefill", 64), ("prefill", 256), ("decode", 64)}
    for role, replicas in (("prefill", 2), ("decode", 1)):
        best = {}
        for p in points:
            if p["role"] == role and p["within_slo"]:
                best[p["length"]] = max(best.get(p["length"], 0.0), p["tokens_per_second"])
        key = f"{role}TokensPerSecond"
        assert result["patch"]["spec"]["autoscaling"]["profile"][key] == round(
            min(best.values()) / replicas, 1
        )
    patch = yaml.safe_load(out.read_text())
    assert patch == result["patch"]
    spec = api.DisaggregatedModelSpec.model_validate({"model": {"source": "org/m"}, **patch["spec"]})
    assert (
        spec.autoscaling.profile.prefill_tokens_per_second
        == patch["spec"]["autoscaling"]["profile"]["prefillTokensPerSecond"]
    )
    # An SLO nothing can meet: no seed, a clear message, exit 1; an unreachable stack: exit 2.
    code, stdout, _ = _profile(serve, tmp_path, "--ttft-slo", "0.000001", "--itl-slo", "0.5")
    assert code == 1 and "met the SLO at no load level" in stdout
    code, _, stderr = _profile(
        ServeProcess(serve.proc, base_url="http://127.0.0.1:9/v1"),
        tmp_path,
        "--ttft-slo",
        "1",
        "--itl-slo",
        "1",
    )
    assert code == 2 and "ConnectError" in stderr
