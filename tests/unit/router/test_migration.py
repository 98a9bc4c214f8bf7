"""Mid-stream migration through the real router app, against in-process KServe v2 stand-ins."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import openai
import pytest
from kvrelay_worker.tokenizer import Tokenizer

from .conftest import toy_generate
from .test_app import MODEL, Stack, run_stack

PROMPT = "héllo wörld — naïve café"


async def _stream_text(stack: Stack, prompt: str, max_tokens: int, **extra: object) -> tuple[str, str | None]:
    events = await stack.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **extra
    )
    parts, finish = [], None
    async for chunk in events:
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


async def _metric(stack: Stack, name: str, **labels: str) -> float:
    text = (await stack.http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _all_decode_healthy(stack: Stack) -> None:
    deadline = time.monotonic() + 10
    while not all(
        w["healthy"] for w in (await stack.http.get("/health")).json()["workers"]["decode"].values()
    ):
        assert time.monotonic() < deadline, "decode workers not healthy again"
        await asyncio.sleep(0.05)


async def test_two_decode_deaths_mid_stream_are_invisible_to_the_client(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_stack(tokenizer_dir, tokenizer, n_decode=3) as stack:
        ids = tokenizer.encode(PROMPT)
        deaths = {len(ids) + 6, len(ids) + 12}  # the request loses its worker after 6 and 12 generated tokens
        for worker in stack.decode:
            worker.die_at_len, worker.token_delay_s = deaths, 0.002
        text, finish = await _stream_text(stack, PROMPT, 40)
        assert (text, finish) == (stack.expected(ids, 40), "length")
        assert sorted(w.decode_calls for w in stack.decode) == [1, 1, 1]
        calls = sorted(
            (r for w in stack.decode for r in w.decode_requests_seen), key=lambda r: len(r["input_ids"])
        )
        want = toy_generate(ids, 40, tokenizer.vocab_size)
        # The first decode call goes on after the prefill's token; each resume after what the client got:
        # 1 + 5 tokens, then a prefill's token + 5 more.
        assert [len(c["input_ids"]) - len(ids) for c in calls] == [0, 6, 12]
        for call in calls:
            n = len(call["input_ids"]) - len(ids)
            assert call["input_ids"] == ids + want[:n] and call["first_token"] == want[n]
            assert call["sampling"]["max_tokens"] == 40 - n
            assert call["sampling"].get("output_offset", 0) == n
        assert await _metric(stack, "kvrelay_router_migrations_total", reason="worker_lost") == 2
        assert await _metric(stack, "kvrelay_router_resume_seconds_count", via="prefill") == 2


async def test_seed_and_position_go_to_the_resume_prefill(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    async with run_stack(tokenizer_dir, tokenizer) as stack:
        ids = tokenizer.encode("the quick")
        deaths = {len(ids) + 4}
        for worker in stack.decode:
            worker.die_at_len = deaths
        reply = await stack.client.completions.create(
            model=MODEL, prompt="the quick", max_tokens=12, temperature=1.0, seed=1234
        )
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
        first, resume = sorted(
            (s for w in stack.prefill for s in w.sampling_seen), key=lambda s: s["max_tokens"]
        )[::-1]
        assert first["seed"] == resume["seed"] == 1234 and "output_offset" not in first
        assert (resume["output_offset"], resume["max_tokens"]) == (4, 8)  # 1 prefill token + 3 decoded


async def test_migration_limit_ends_the_stream_with_a_clear_error(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_stack(tokenizer_dir, tokenizer, n_decode=5, max_migrations=3) as stack:
        for worker in stack.decode:
            worker.die_after = 2
        with pytest.raises(openai.APIError, match=r"4 times, over the limit of 3 migration\(s\)") as info:
            await _stream_text(stack, "the quick", 60)
        assert info.value.code == "migration_limit_exceeded"
        assert sum(w.decode_calls for w in stack.decode) == 4
        assert await _metric(stack, "kvrelay_router_migrations_total", reason="worker_lost") == 3
        assert await _metric(stack, "kvrelay_router_migration_failures_total", reason="limit") == 1
        # Not streaming: the same failure is a 500 with the same error body.
        await _all_decode_healthy(stack)  # the fakes "died" but still answer readiness checks
        with pytest.raises(openai.InternalServerError, match="over the limit"):
            await stack.client.completions.create(model=MODEL, prompt="the quick", max_tokens=60)


async def test_drain_and_stall_migrate_but_a_kv_transfer_failure_does_not(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_stack(tokenizer_dir, tokenizer, decode_idle_timeout_s=0.5) as stack:
        ids = tokenizer.encode("the lazy dog")
        # A draining worker ends its streams at the deadline (UNAVAILABLE "draining: deadline passed").
        deaths = {len(ids) + 3}
        for worker in stack.decode:
            worker.die_at_len, worker.die_message = deaths, "draining: deadline passed"
        assert await _stream_text(stack, "the lazy dog", 10) == (stack.expected(ids, 10), "length")
        assert await _metric(stack, "kvrelay_router_migrations_total", reason="draining") == 1

        # Alive but silent past the idle timeout: resumed elsewhere, the stuck call is cancelled.
        for worker in stack.decode:
            worker.die_at_len, worker.token_delay_s, worker.cancelled = set(), 0.0, 0
        stack.decode[0].token_delay_s = stack.decode[1].token_delay_s = 30.0
        started = time.monotonic()
        task = asyncio.create_task(_stream_text(stack, "the lazy dog", 10))
        while sum(w.decode_calls for w in stack.decode) < 3:
            await asyncio.sleep(0.01)
        stuck = next(w for w in stack.decode if w.token_delay_s and w.decode_calls == 2)
        other = next(w for w in stack.decode if w is not stuck)
        other.token_delay_s = 0.0
        assert await task == (stack.expected(ids, 10), "length")
        assert time.monotonic() - started < 10 and stuck.cancelled == 1
        assert await _metric(stack, "kvrelay_router_migrations_total", reason="stalled") == 1

        # kvTransfer failurePolicy `fail`: the decode worker refuses in-band, the client gets that at once.
        for worker in stack.decode:
            worker.token_delay_s = 0.0
            worker.die_after, worker.die_in_band = 0, True  # before any token
            worker.die_message = "KV transfer failed: [holder_unreachable] connection refused"
        with pytest.raises(openai.APIError, match="KV transfer failed") as info:
            await _stream_text(stack, "the lazy dog", 10)
        assert info.value.code == "kv_transfer_failed"
        assert await _metric(stack, "kvrelay_router_migrations_total", reason="worker_lost") == 0


async def test_resume_via_decode_recomputes_there(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    async with run_stack(tokenizer_dir, tokenizer, resume_via="decode") as stack:
        ids = tokenizer.encode(PROMPT)
        deaths = {len(ids) + 5}
        for worker in stack.decode:
            worker.die_at_len = deaths
        assert await _stream_text(stack, PROMPT, 20) == (stack.expected(ids, 20), "length")
        assert sum(w.prefill_calls for w in stack.prefill) == 1  # no resume prefill
        resumed = max(
            (r for w in stack.decode for r in w.decode_requests_seen), key=lambda r: len(r["input_ids"])
        )
        assert (
            len(resumed["input_ids"]) == len(ids) + 4
        )  # the prefill's token + 4, the last one as first_token
        assert [h for w in stack.decode for h in w.handles_seen if not h] == [b""]
        assert await _metric(stack, "kvrelay_router_resume_seconds_count", via="decode") == 1


async def test_resume_prefill_failure_falls_back_to_recompute_on_decode(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_stack(tokenizer_dir, tokenizer) as stack:
        ids = tokenizer.encode(PROMPT)
        deaths = {len(ids) + 5}
        for worker in stack.decode:
            worker.die_at_len, worker.token_delay_s = deaths, 0.05
        events = await stack.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True
        )
        parts = []
        async for chunk in events:
            if not parts:  # the first token is out: from now on every prefill worker fails
                for worker in stack.prefill:
                    worker.fail_prefill = True
            parts.append(chunk.choices[0].text)
        assert "".join(parts) == stack.expected(ids, 16)
        assert [h for w in stack.decode for h in w.handles_seen if not h] == [b""]
        handles = [json.loads(h) for w in stack.decode for h in w.handles_seen if h]
        assert handles == [{"prompt": ids}]
