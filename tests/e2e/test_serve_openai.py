"""`kvrelay serve` (real router + prefill + decode processes, real KV relay) with the official openai client.

Greedy outputs must equal the single-process engine's; bad requests get OpenAI errors; 32 concurrent
streams all finish correctly; stopping serve leaves no worker behind.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from kvrelay_worker.model_store import ensure_tiny_model
from kvrelay_worker.tokenizer import Tokenizer
from serve_helpers import WORKER_RE, ServeProcess, run_serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServeProcess]:
    with run_serve(
        ["--model", "tiny", "--prefill", "1", "--decode", "1"], tmp_path_factory.mktemp("logs")
    ) as s:
        yield s
    assert s.proc.returncode in (0, 130, -15), "\n".join(s.output[-20:])
    assert s.leftovers == [], f"workers left running after serve stopped: {s.leftovers}"
    assert any("stopped" in line for line in s.output[-5:])


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path, tokenizer: Tokenizer):  # type: ignore[no-untyped-def]
    """Greedy text from the single-process engine (no router, no KV relay) for given prompt ids."""
    from kvrelay_worker.engine.core import Engine, EngineConfig
    from kvrelay_worker.engine.sampling_params import SamplingParams

    engine = Engine.from_dir(model_dir, EngineConfig())

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


def test_chat_greedy_equals_engine(client: openai.OpenAI, serve: ServeProcess, tokenizer, reference) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "where is the station?"}]
    want = reference([tokenizer.encode_chat(messages)], 20)[0]
    reply = client.chat.completions.create(model=serve.model, messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == want
    stream = client.chat.completions.create(
        model=serve.model, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, serve: ServeProcess) -> None:
    def once() -> str:
        reply = client.completions.create(
            model=serve.model, prompt="Clouds drift", max_tokens=16, temperature=0.9, top_p=0.9, seed=1234
        )
        return reply.choices[0].text

    assert once() == once()


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


def test_bad_requests_get_4xx_and_serving_continues(client: openai.OpenAI, serve: ServeProcess) -> None:
    model = serve.model
    chat_ok = [{"role": "user", "content": "hi"}]
    bad: list[tuple[str, bytes | dict[str, object], int]] = [
        ("/completions", b'{"model": "tiny", "prompt": ', 400),
        ("/completions", b"null", 400),
        ("/completions", {"model": "gpt-4", "prompt": "hi"}, 404),
        ("/completions", {"model": model}, 400),
        ("/completions", {"model": model, "prompt": "hi", "max_tokens": 5000}, 400),
        ("/completions", {"model": model, "prompt": "hi " * 2100}, 400),
        ("/completions", {"model": model, "prompt": "hi", "temperature": -0.5}, 400),
        ("/completions", {"model": model, "prompt": "hi", "top_p": 2}, 400),
        ("/completions", {"model": model, "prompt": "hi", "n": 3}, 400),
        ("/completions", {"model": model, "prompt": "hi", "max_tokens": -1}, 400),
        ("/completions", {"model": model, "prompt": [0, 100000]}, 400),
        ("/completions", {"model": model, "prompt": "hi", "logprobs": 2}, 400),
        ("/chat/completions", {"model": model, "messages": "hi"}, 400),
        ("/chat/completions", {"model": model, "messages": [{"content": "no role"}]}, 400),
        ("/chat/completions", {"model": model, "messages": chat_ok, "stop": ["1", "2", "3", "4", "5"]}, 400),
        ("/chat/completions", {"model": model, "messages": chat_ok, "n": 2}, 400),
    ]
    with httpx.Client(base_url=serve.base_url, timeout=30) as http:
        for path, body, status in bad:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            resp = http.post(path, content=content, headers={"content-type": "application/json"})
            assert resp.status_code == status, (path, body, resp.text)
            error = resp.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error", error
        assert http.get(serve.base_url.removesuffix("/v1") + "/health").status_code == 200
    # The official client maps these to its exception types, too.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=4096)
    reply = client.completions.create(model=model, prompt="still serving", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].text


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


def _decode_running(serve: ServeProcess) -> float:
    """`kvrelay_requests_running` summed over the decode workers' own /metrics."""
    total = 0.0
    for line in serve.output:
        if (m := WORKER_RE.search(line)) and m.group(1).startswith("decode"):
            text = httpx.get(f"http://127.0.0.1:{m.group(4)}/metrics", timeout=10).text
            total += sum(
                float(row.rsplit(" ", 1)[1])
                for row in text.splitlines()
                if row.startswith("kvrelay_requests_running{") and 'role="decode"' in row
            )
    return total


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
