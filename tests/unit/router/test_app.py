"""The router app over real HTTP (uvicorn, official openai client) against in-process KServe v2 stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import uvicorn
from kvrelay_worker.router.app import create_app
from kvrelay_worker.router.config import RouterConfig
from kvrelay_worker.router.discovery import StaticDiscovery
from kvrelay_worker.router.logprobs import token_text
from kvrelay_worker.tokenizer import Tokenizer
from pydantic import SecretStr

from .conftest import FakeWorker, run_fake_worker, toy_generate, toy_logprobs, toy_next

MODEL = "toy"
MAX_LEN = 128


@dataclass
class Stack:
    url: str
    prefill: list[FakeWorker]
    decode: list[FakeWorker]
    tokenizer: Tokenizer
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient
    decode_servers: list[grpc.aio.Server]

    def expected(self, prompt_ids: list[int], max_tokens: int) -> str:
        return self.tokenizer.decode(toy_generate(prompt_ids, max_tokens, self.tokenizer.vocab_size))


@contextlib.asynccontextmanager
async def run_stack(
    tokenizer_dir: Path,
    tokenizer: Tokenizer,
    api_key: str | None = None,
    decode_idle_timeout_s: float = 120.0,
    n_decode: int = 2,
    max_migrations: int = 3,
    resume_via: str = "prefill",
) -> AsyncIterator[Stack]:
    vocab = tokenizer.vocab_size
    async with contextlib.AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(run_fake_worker(vocab)) for _ in range(2 + n_decode)]
        config = RouterConfig(
            model_dir=tokenizer_dir,
            served_model_name=MODEL,
            max_model_len=MAX_LEN,
            prefill=[w[0] for w in workers[:2]],
            decode=[w[0] for w in workers[2:]],
            api_key=SecretStr(api_key) if api_key else None,
            health_interval_s=0.2,
            decode_idle_timeout_s=decode_idle_timeout_s,
            max_migrations=max_migrations,
            resume_via=resume_via,
        )
        app = create_app(config, StaticDiscovery(config.prefill, config.decode), tokenizer)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "router did not start in 10 s"
            assert not task.done(), "router exited during start-up"
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        http = httpx.AsyncClient(base_url=url, timeout=10)
        client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=10
        )
        try:
            prefill, decode = [w[1] for w in workers[:2]], [w[1] for w in workers[2:]]
            yield Stack(url, prefill, decode, tokenizer, client, http, [w[2] for w in workers[2:]])
        finally:
            await client.close()
            await http.aclose()
            server.should_exit = True
            await asyncio.wait_for(task, 10)


@pytest.fixture
async def stack(tokenizer_dir: Path, tokenizer: Tokenizer) -> AsyncIterator[Stack]:
    async with run_stack(tokenizer_dir, tokenizer) as s:
        yield s


async def test_completion_non_streaming_matches_model(stack: Stack) -> None:
    prompt = "the quick brown fox"
    reply = await stack.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = stack.tokenizer.encode(prompt)
    assert reply.choices[0].text == stack.expected(ids, 12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 12)
    assert stack.prefill[0].sampling_seen[0]["temperature"] == 0
    assert stack.prefill[0].sampling_seen[0]["stop_token_ids"] == [1]


async def test_completion_streaming_with_usage(stack: Stack) -> None:
    prompt = "héllo wörld"
    events = await stack.client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage = [], None, None
    async for chunk in events:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(texts) == stack.expected(stack.tokenizer.encode(prompt), 20)
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 20


async def test_token_id_prompt_and_max_tokens_one(stack: Stack) -> None:
    reply = await stack.client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1, temperature=0)
    assert reply.choices[0].text == stack.expected([5, 6, 7], 1)
    assert sum(w.decode_calls for w in stack.decode) == 0  # finished at the first token: no decode call


async def test_chat_streaming_and_not(stack: Stack) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = stack.tokenizer.encode_chat(messages)
    want = stack.expected(ids, 10)
    reply = await stack.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    assert reply.choices[0].message.content == want
    assert reply.choices[0].message.role == "assistant"
    chunks = [
        c
        async for c in await stack.client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True
        )
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_stop_string_cuts_output(stack: Stack) -> None:
    prompt = "numbers 0 1 2"
    full = stack.expected(stack.tokenizer.encode(prompt), 30)
    stop = full[8:11]
    assert stop and full.find(stop) >= 0
    for stream in (False, True):
        if stream:
            chunks = await stack.client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop], stream=True
            )
            parts = [c async for c in chunks]
            text = "".join(c.choices[0].text for c in parts)
            finish = parts[-1].choices[0].finish_reason
        else:
            reply = await stack.client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop
            )
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert text == full[: full.find(stop)]
        assert finish == "stop"


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, None),  # no model
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": MAX_LEN},
        400,
        "context_length_exceeded",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 3}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 65}, 400, "invalid_value"),  # over the bound
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "echo": False, "max_tokens": 0},
        400,
        "invalid_value",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": "a"},
        400,
        None,
    ),
    ("/v1/nope", {}, 404, "not_found"),
]


async def test_bad_requests_get_openai_errors_and_server_keeps_serving(stack: Stack) -> None:
    for path, body, status, code in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = await stack.http.post(path, content=content, headers={"content-type": "application/json"})
        assert resp.status_code == status, (path, body, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        if code is not None:
            assert error["code"] == code, (body, error)
    resp = await stack.http.get("/v1/completions")
    assert resp.status_code == 405 and "error" in resp.json()
    reply = await stack.client.completions.create(model=MODEL, prompt="still here", max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    metrics = (await stack.http.get("/metrics")).text
    assert f'kvrelay_requests_total{{model="{MODEL}",status="client_error"}} 16.0' in metrics


async def test_prefill_failure_is_retried_on_the_other_worker(stack: Stack) -> None:
    stack.prefill[0].fail_prefill = True
    stack.prefill[1].fail_prefill = False
    for _ in range(2):
        reply = await stack.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=4)
        assert len(reply.choices[0].text) > 0
    assert stack.prefill[1].prefill_calls == 2
    stack.prefill[1].fail_prefill = True
    with pytest.raises(openai.APIStatusError) as info:
        await stack.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=4)
    assert info.value.status_code in (500, 503)


async def test_all_decode_workers_dead_gives_error_event_then_survivor_serves(stack: Stack) -> None:
    for worker in stack.decode:
        worker.die_after = 3
        worker.token_delay_s = 0.01
    started = time.monotonic()
    events = await stack.client.completions.create(
        model=MODEL, prompt="the quick", max_tokens=50, stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match=r"no ready decode worker to resume .* after 2 migration"):
        async for chunk in events:
            received.append(chunk)
    assert time.monotonic() - started < 10
    assert len(received) >= 1  # the first token arrived before the failure
    assert [w.decode_calls for w in stack.decode] == [1, 1]  # resumed once, on the other worker
    first = min((0, 1), key=lambda i: len(stack.decode[i].decode_requests_seen[0]["input_ids"]))
    await stack.decode_servers[first].stop(grace=None)  # the process is gone for good
    dead, survivor = stack.decode[first], stack.decode[1 - first]
    dead.decode_calls = 0
    survivor.die_after = None
    deadline = (
        time.monotonic() + 10
    )  # both were marked down: wait for the readiness checks to tell them apart
    while [w["healthy"] for w in (await stack.http.get("/health")).json()["workers"]["decode"].values()] != [
        i != first for i in range(2)
    ]:
        assert time.monotonic() < deadline, "readiness checks did not find the survivor"
        await asyncio.sleep(0.05)
    for _ in range(3):
        reply = await stack.client.completions.create(model=MODEL, prompt="the quick", max_tokens=6)
        assert reply.choices[0].finish_reason == "length"
    assert survivor.decode_calls == 4 and dead.decode_calls == 0
    metrics = (await stack.http.get("/metrics")).text
    assert f'kvrelay_router_migrations_total{{model="{MODEL}",reason="worker_lost"}} 2.0' in metrics
    assert f'kvrelay_router_migration_failures_total{{model="{MODEL}",reason="no_worker"}} 1.0' in metrics


async def test_decode_worker_gone_before_first_token_resumes_via_a_new_prefill(stack: Stack) -> None:
    stack.decode[0].die_after = 0  # the first decode worker in rotation fails before relaying anything
    prompt = "the quick brown"
    ids = stack.tokenizer.encode(prompt)
    reply = await stack.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == stack.expected(ids, 8)
    assert stack.decode[0].decode_calls == 1 and stack.decode[0].handles_seen[0] != b""
    # The resume prefilled prompt + the first token (not a re-read of a half-claimed handle) ...
    first_token = toy_generate(ids, 1, stack.tokenizer.vocab_size)[0]
    prefilled = [p for w in stack.prefill for p in w.prefill_inputs_seen]
    assert sorted(prefilled, key=len) == [ids, [*ids, first_token]]
    # ... and the other decode worker read that new KV.
    assert json.loads(stack.decode[1].handles_seen[0]) == {"prompt": [*ids, first_token]}


async def test_unexpected_errors_still_answer_in_openai_shape(stack: Stack) -> None:
    for worker in stack.decode:
        worker.garbage_tokens = True
    with pytest.raises(openai.InternalServerError):
        await stack.client.completions.create(model=MODEL, prompt="the quick", max_tokens=5)
    events = await stack.client.completions.create(model=MODEL, prompt="the quick", max_tokens=5, stream=True)
    with pytest.raises(openai.APIError, match="internal error"):
        async for _ in events:
            pass
    for worker in stack.decode:
        worker.garbage_tokens = False
    reply = await stack.client.completions.create(model=MODEL, prompt="the quick", max_tokens=5)
    assert reply.choices[0].finish_reason == "length"


async def test_client_disconnect_cancels_decode(stack: Stack) -> None:
    for worker in stack.decode:
        worker.token_delay_s = 0.05
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 100, "stream": True}
    async with stack.http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        got = 0
        async for line in lines:
            got += line.startswith("data:")
            if got >= 3:
                break
    deadline = time.monotonic() + 10  # generous: CI machines are often oversubscribed
    while sum(w.cancelled for w in stack.decode) == 0:
        assert time.monotonic() < deadline, "decode call was not cancelled after the client left"
        await asyncio.sleep(0.05)
    assert sum(w.decode_calls for w in stack.decode) == 1


async def test_client_disconnect_cancels_a_non_streaming_request(stack: Stack) -> None:
    for worker in stack.decode:
        worker.token_delay_s = 0.05
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 100}
    with pytest.raises(httpx.ReadTimeout):
        await stack.http.post("/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10  # generous: CI machines are often oversubscribed
    while sum(w.cancelled for w in stack.decode) == 0:
        assert time.monotonic() < deadline, "decode call was not cancelled after the client left"
        await asyncio.sleep(0.05)


async def test_client_disconnect_during_prefill_cancels_it(stack: Stack) -> None:
    for worker in stack.prefill:
        worker.prefill_delay_s = 5.0
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 10, "stream": True}
    with pytest.raises(httpx.ReadTimeout):
        await stack.http.post("/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10  # generous: CI machines are often oversubscribed
    while sum(w.prefill_cancelled for w in stack.prefill) == 0:
        assert time.monotonic() < deadline, "prefill call was not cancelled after the client left"
        await asyncio.sleep(0.05)
    assert sum(w.decode_calls for w in stack.decode) == 0
    metrics = (await stack.http.get("/metrics")).text
    assert f'kvrelay_requests_total{{model="{MODEL}",status="cancelled"}} 1.0' in metrics


async def test_models_health_metrics(stack: Stack) -> None:
    models = await stack.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = await stack.http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    await stack.client.completions.create(model=MODEL, prompt="hi", max_tokens=5)
    metrics = (await stack.http.get("/metrics")).text
    assert f'kvrelay_time_to_first_token_seconds_count{{model="{MODEL}"}} 1.0' in metrics
    assert f'kvrelay_inter_token_latency_seconds_count{{model="{MODEL}"}} 4.0' in metrics
    assert f'kvrelay_generation_tokens_total{{model="{MODEL}"}} 5.0' in metrics
    assert f'kvrelay_requests_total{{model="{MODEL}",status="success"}} 1.0' in metrics


async def test_stuck_decode_worker_ends_the_stream_with_an_error(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_stack(tokenizer_dir, tokenizer, decode_idle_timeout_s=0.5) as stack:
        for worker in stack.decode:
            worker.token_delay_s = 30.0  # alive (readiness passes) but never sends a token
        started = time.monotonic()
        events = await stack.client.completions.create(
            model=MODEL, prompt="the quick", max_tokens=5, stream=True
        )
        with pytest.raises(openai.APIError, match=r"no token for 0\.5 s"):
            async for _ in events:
                pass
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 10  # generous: CI machines are often oversubscribed
        while sum(w.cancelled for w in stack.decode) == 0:
            assert time.monotonic() < deadline, "the stuck decode call was not cancelled"
            await asyncio.sleep(0.05)


async def test_api_key(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    async with run_stack(tokenizer_dir, tokenizer, api_key="s3cret") as stack:
        reply = await stack.client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert reply.choices[0].text
        resp = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        wrong = await stack.http.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await stack.http.get("/health")).status_code == 200


# --- logprobs --------------------------------------------------------------------------------------


def want_logprobs(stack: Stack, prev: int, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    return toy_logprobs(prev, token, k, stack.tokenizer.vocab_size)


async def test_chat_logprobs_streaming_and_not(stack: Stack) -> None:
    """Each generated token: its logprob, bytes and top alternatives, as the worker reported them; the
    stream's chunks carry their own tokens' entries, which add up to the non-streamed answer's."""
    messages = [{"role": "user", "content": "hello"}]
    ids = stack.tokenizer.encode_chat(messages)
    tokens = toy_generate(ids, 8, stack.tokenizer.vocab_size)
    reply = await stack.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert [stack.tokenizer.token_bytes(t) for t in tokens] == [bytes(c.bytes) for c in content]
    for prev, token, entry in zip([ids[-1], *tokens], tokens, content, strict=False):
        logprob, top = want_logprobs(stack, prev, token, 3)
        assert entry.logprob == pytest.approx(logprob)
        assert [(stack.tokenizer.token_bytes(i), lp) for i, lp in top] == [
            (bytes(t.bytes), pytest.approx(t.logprob)) for t in entry.top_logprobs
        ]
    assert reply.usage.completion_tokens == len(content) == 8
    # every call of the request asked for them: the prefill and the decode
    (prefill,) = [s for w in stack.prefill for s in w.sampling_seen]
    assert prefill["logprobs"] == 3 and "prompt_logprobs" not in prefill
    (decode,) = [w for w in stack.decode if w.decode_requests_seen]
    assert decode.decode_requests_seen[-1]["sampling"]["logprobs"] == 3
    chunks = [
        c
        async for c in await stack.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
            stream=True,
        )
    ]  # fmt: skip
    assert chunks[0].choices[0].logprobs is None and chunks[-1].choices[0].logprobs is None
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    for worker in stack.prefill:
        worker.sampling_seen.clear()
    plain = await stack.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None
    (prefill,) = [s for w in stack.prefill for s in w.sampling_seen]
    assert "logprobs" not in prefill


async def test_a_token_held_back_still_gets_its_chunk(stack: Stack) -> None:
    """A token that is half of a character has no text yet, but its chunk carries its logprob."""
    vocab = stack.tokenizer.vocab_size

    def partial(t: int) -> bool:
        return stack.tokenizer.token_bytes(t)[:1] in (b"\xe6", b"\xf0", b"\xe4")

    start = next(t for t in range(2, vocab) if partial(toy_next(t, vocab)))
    tokens = toy_generate([start], 6, vocab)
    chunks = [
        c
        async for c in await stack.client.completions.create(
            model=MODEL, prompt=[start], max_tokens=6, temperature=0, logprobs=0, stream=True
        )
    ]
    held = chunks[0].choices[0]
    assert held.text == "" and held.logprobs.tokens[0].startswith("bytes:\\x")
    entries = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(entries) == 6
    assert entries == [token_text(stack.tokenizer.token_bytes(t)) for t in tokens]


async def test_completion_echo_with_prompt_logprobs(stack: Stack) -> None:
    """echo + logprobs: the prompt's tokens first (the first with null logprobs), then the completion's;
    the text is prompt + completion; offsets count characters from the prompt's start."""
    prompt = "the quick brown"
    ids = stack.tokenizer.encode(prompt)
    tokens = toy_generate(ids, 5, stack.tokenizer.vocab_size)
    completion = stack.tokenizer.decode(tokens)
    reply = await stack.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    choice = reply.choices[0]
    assert choice.text == prompt + completion
    lp = choice.logprobs
    everything = [*ids, *tokens]
    assert lp.tokens == [token_text(stack.tokenizer.token_bytes(t)) for t in everything]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(everything)):
        logprob, top = want_logprobs(stack, everything[i - 1], everything[i], 2)
        assert lp.token_logprobs[i] == pytest.approx(logprob)
        names = {token_text(stack.tokenizer.token_bytes(t)): v for t, v in top}
        names.setdefault(lp.tokens[i], logprob)
        assert lp.top_logprobs[i] == pytest.approx(names)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(prompt)
    for offset, name in zip(lp.text_offset, lp.tokens, strict=True):
        assert name.startswith("bytes:") or choice.text[offset : offset + len(name)] == name
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 5
    (first_prefill,) = [s for w in stack.prefill for s in w.sampling_seen]
    assert (first_prefill["logprobs"], first_prefill["prompt_logprobs"]) == (2, 2)
    (decode,) = [r for w in stack.decode for r in w.decode_requests_seen]
    assert "prompt_logprobs" not in decode["sampling"]
    # streamed: the prompt's chunk, then the tokens' chunks; together the non-streamed answer
    chunks = [
        c
        async for c in await stack.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True, stream=True
        )
    ]
    assert chunks[0].choices[0].text == prompt and len(chunks[0].choices[0].logprobs.tokens) == len(ids)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [v for c in chunks if c.choices[0].logprobs for v in getattr(c.choices[0].logprobs, key)]
        assert streamed == getattr(lp, key), key
    # without echo: the completion's tokens alone, offsets still counted from the prompt's start
    reply = await stack.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2
    )
    assert reply.choices[0].text == completion and reply.choices[0].logprobs.tokens == lp.tokens[len(ids) :]
    assert reply.choices[0].logprobs.text_offset == lp.text_offset[len(ids) :]


async def test_echo_with_max_tokens_zero_is_the_prompt_alone(stack: Stack) -> None:
    """lm-evaluation-harness scores text this way: one prefill (max_tokens 1, which ends the request at its
    first token and so holds no KV), its token dropped, no decode call."""
    ids = [5, 6, 7, 8]
    for stream in (False, True):
        kwargs = {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
        if stream:
            chunks = [c async for c in await stack.client.completions.create(**kwargs, stream=True)]
            text = "".join(c.choices[0].text for c in chunks)
            lp = chunks[0].choices[0].logprobs
            finish = chunks[-1].choices[0].finish_reason
        else:
            reply = await stack.client.completions.create(**kwargs)
            text, lp, finish = (
                reply.choices[0].text,
                reply.choices[0].logprobs,
                reply.choices[0].finish_reason,
            )
            assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == 4
        assert text == stack.tokenizer.decode(ids) and finish == "length"
        assert len(lp.tokens) == 4 and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(
            [want_logprobs(stack, a, b, 1)[0] for a, b in itertools.pairwise(ids)]
        )
    assert sum(w.decode_calls for w in stack.decode) == 0
    seen = [s for w in stack.prefill for s in w.sampling_seen]
    assert [(s["max_tokens"], s["prompt_logprobs"]) for s in seen] == [(1, 1), (1, 1)]
    reply = await stack.client.completions.create(model=MODEL, prompt="hi", max_tokens=0, echo=True)
    assert reply.choices[0].text == "hi" and reply.choices[0].logprobs is None


async def test_logprobs_go_on_across_a_migration(stack: Stack) -> None:
    """A decode worker lost mid-stream: the resumed request's tokens keep coming with their logprobs, each
    token's once; the re-prefill asks logprobs (for the token it samples), never the prompt's."""
    stack.decode[0].die_after = 3
    stack.decode[1].die_after = None
    ids = [9, 10, 11]
    tokens = toy_generate(ids, 12, stack.tokenizer.vocab_size)
    reply = await stack.client.completions.create(
        model=MODEL, prompt=ids, max_tokens=12, temperature=0, logprobs=1, echo=True
    )
    lp = reply.choices[0].logprobs
    everything = [*ids, *tokens]
    assert lp.tokens == [token_text(stack.tokenizer.token_bytes(t)) for t in everything]
    want = [want_logprobs(stack, a, b, 1)[0] for a, b in itertools.pairwise(everything)]
    assert lp.token_logprobs[1:] == pytest.approx(want)
    prefills = sorted(
        (s for w in stack.prefill for s in w.sampling_seen), key=lambda s: s.get("output_offset", 0)
    )
    assert len(prefills) >= 2 and prefills[0]["prompt_logprobs"] == 1
    assert all(s["logprobs"] == 1 and "prompt_logprobs" not in s for s in prefills[1:])


async def test_completion_batch_one_choice_per_prompt(stack: Stack) -> None:
    """A list of prompts: choice i is prompt i's own completion, usage sums over all, streamed or not."""
    texts = ["the quick brown fox", "héllo wörld", "stop here"]
    for prompts in (texts, [[5, 6, 7], [8, 9]]):
        ids = [p if isinstance(p, list) else stack.tokenizer.encode(p) for p in prompts]
        want = [stack.expected(i, 6) for i in ids]
        reply = await stack.client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=6, temperature=0
        )
        assert [c.index for c in reply.choices] == list(range(len(prompts)))
        assert [c.text for c in reply.choices] == want
        assert reply.usage.prompt_tokens == sum(len(i) for i in ids)
        assert reply.usage.completion_tokens == 6 * len(prompts)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        events = await stack.client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in events]
        streamed = ["" for _ in prompts]
        finishes: list[str | None] = [None for _ in prompts]
        for chunk in chunks[:-1]:
            (choice,) = chunk.choices
            streamed[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        assert streamed == want and finishes == ["length"] * len(prompts)
        assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    assert sum(w.prefill_calls for w in stack.prefill) == 2 * (len(texts) + 2)  # each its own request


async def test_completion_batch_echo_and_logprobs_per_choice(stack: Stack) -> None:
    prompts = ["the quick", "the lazy dog"]
    reply = await stack.client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=3, temperature=0, logprobs=1, echo=True
    )
    for prompt, choice in zip(prompts, reply.choices, strict=True):
        ids = stack.tokenizer.encode(prompt)
        assert choice.text == prompt + stack.expected(ids, 3)  # its own prompt echoed
        assert len(choice.logprobs.tokens) == len(ids) + 3 and choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.text_offset[len(ids)] == len(prompt)


async def test_completion_batch_bad_prompt_is_a_400_before_any_generation(stack: Stack) -> None:
    for prompt, param, code in (
        (["fine", ""], "prompt", "invalid_value"),
        ([[5, 6], [7, 99999]], "prompt", "invalid_value"),
        (["fine", "hi " * 200], "prompt", "context_length_exceeded"),
        (["a"] * 65, "prompt", "invalid_value"),
    ):
        resp = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["param"], error["code"]) == (param, code), error
        assert error["message"].startswith("prompt 1: ") or "at most 64 choices" in error["message"]
    assert sum(w.prefill_calls for w in stack.prefill) == 0
    ok = await stack.client.completions.create(model=MODEL, prompt=["a"] * 64, max_tokens=1)
    assert [c.index for c in ok.choices] == list(range(64))


async def test_completion_batch_one_failure_fails_the_request_and_cancels_the_rest(stack: Stack) -> None:
    """One prompt's decode fails (refused in band, so no migration): the whole request fails as a single
    one would, and the other prompts' decode calls are cancelled."""
    prompts = [[5, 6, 7], list(range(10, 20)), list(range(30, 40))]
    for worker in stack.decode:
        worker.token_delay_s = 0.05
        worker.die_in_band = True
    for stream in (False, True):
        dies = {len(prompts[0]) + 1 + 3}  # the short prompt's fourth decode step; the others never get there
        for worker in stack.decode:
            worker.die_at_len = dies
            worker.decode_calls = worker.cancelled = 0
        started = time.monotonic()
        if stream:
            events = await stack.client.completions.create(
                model=MODEL, prompt=prompts, max_tokens=30, temperature=0, stream=True
            )
            with pytest.raises(openai.APIError, match="decode worker died"):
                async for _ in events:
                    pass
        else:
            with pytest.raises(openai.APIStatusError, match="decode worker died") as info:
                await stack.client.completions.create(
                    model=MODEL, prompt=prompts, max_tokens=30, temperature=0
                )
            assert info.value.status_code == 500
        deadline = time.monotonic() + 10
        while sum(w.cancelled for w in stack.decode) < 2:
            assert time.monotonic() < deadline, "the other prompts' decode calls were not cancelled"
            await asyncio.sleep(0.05)
        assert sum(w.decode_calls for w in stack.decode) == 3
        assert time.monotonic() - started < 1.5  # not left to run their 30 tokens (1.5 s each)
