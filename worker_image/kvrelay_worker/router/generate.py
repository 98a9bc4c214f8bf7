"""One request through the disaggregated path: prefill (retried once elsewhere), then relay the decode stream.

client ──► router ──ModelInfer──► prefill worker   (first token + KV handle)
              │ first token to the client at once
              └──ModelStreamInfer(handle)──► decode worker ──tokens──► router ──SSE──► client
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kvrelay_worker.router.errors import OpenAIError, server_error
from kvrelay_worker.router.kserve import PrefillResult, WorkerFailed
from kvrelay_worker.router.metrics import RouterMetrics
from kvrelay_worker.router.pool import WorkerPool, WorkerState
from kvrelay_worker.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

PREFILL_ATTEMPTS = 2  # the first try plus one retry on another worker
DECODE_ATTEMPTS = 2  # only when the first decode worker failed before relaying any token


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop | length
    num_prompt_tokens: int
    num_completion_tokens: int


Event = TextDelta | Finished


async def _prefill(
    pool: WorkerPool, request_id: str, prompt_ids: list[int], sampling: dict[str, Any]
) -> PrefillResult:
    """Call the least-loaded prefill worker; on failure retry once on another one."""
    tried: list[str] = []
    last_error: WorkerFailed | None = None
    for _ in range(PREFILL_ATTEMPTS):
        worker = pool.roles["prefill"].choose(exclude=tried)
        if worker is None:
            break
        tried.append(worker.client.address)
        worker.queued_prefill_tokens += len(prompt_ids)
        try:
            return await worker.client.prefill(request_id, prompt_ids, sampling)
        except WorkerFailed as exc:
            last_error = exc
            if exc.worker_down:
                pool.mark_down(worker)
        finally:
            worker.queued_prefill_tokens -= len(prompt_ids)
    if last_error is None:
        raise server_error("no ready prefill worker", code="no_prefill_worker", status=503)
    raise server_error(f"prefill failed after {len(tried)} attempt(s): {last_error}", code="prefill_failed")


async def generate(
    pool: WorkerPool,
    tokenizer: Tokenizer,
    metrics: RouterMetrics,
    request_id: str,
    prompt_ids: list[int],
    sampling: dict[str, Any],
    stop: list[str],
    arrival: float,
    decode_idle_timeout_s: float | None = None,
) -> AsyncIterator[Event]:
    """Yield text deltas then one `Finished`; raises `OpenAIError` on failure. `arrival` is monotonic."""
    detok = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(stop)
    eos_ids = set() if sampling.get("ignore_eos") else set(tokenizer.eos_token_ids)
    num_tokens = 0

    def push(token_id: int, finish_reason: str | None) -> str:
        nonlocal num_tokens
        num_tokens += 1
        metrics.generation_tokens.inc()
        if finish_reason == "stop" and token_id in eos_ids:
            return ""  # the EOS token ends the text; it is not part of it
        return matcher.feed(detok.push(token_id))

    def finished(reason: str) -> Finished:
        return Finished("stop" if matcher.stopped else reason, len(prompt_ids), num_tokens)

    first = await _prefill(pool, request_id, prompt_ids, sampling)
    last_token_at = time.monotonic()
    metrics.ttft.observe(last_token_at - arrival)
    text = push(first.token_id, first.finish_reason or None)
    # The first delta goes out even when empty, so the client sees the stream start at once.
    yield TextDelta(text)
    if matcher.stopped or first.finish_reason:
        tail = matcher.feed(detok.flush()) + matcher.flush()
        if tail:
            yield TextDelta(tail)
        yield finished(first.finish_reason or "stop")
        return

    # A decode worker that is gone before relaying anything is retried once elsewhere, with an empty
    # handle (recompute the prompt there): the first reader may have half-claimed the KV blocks.
    kv_handle, tried = first.kv_handle, []
    while True:
        worker = pool.roles["decode"].choose(exclude=tried)
        if worker is None:
            raise server_error("no ready decode worker", code="no_decode_worker", status=503)
        tried.append(worker.client.address)
        relayed = 0
        try:
            relay = _relay_decode(
                pool, worker, request_id, prompt_ids, first.token_id, kv_handle, sampling, push, metrics,
                decode_idle_timeout_s,
            )  # fmt: skip
            async for text, reason in relay:
                relayed += 1
                if text:
                    yield TextDelta(text)
                if matcher.stopped:
                    yield finished("stop")
                    return  # closing the decode iterator cancels the call on the worker
                if reason is not None:
                    tail = matcher.feed(detok.flush()) + matcher.flush()
                    if tail:
                        yield TextDelta(tail)
                    yield finished(reason)
                    return
        except WorkerFailed as exc:
            if relayed or not exc.worker_down or len(tried) >= DECODE_ATTEMPTS:
                raise server_error(str(exc), code="decode_failed") from None
            kv_handle = b""


async def _relay_decode(
    pool: WorkerPool,
    worker: WorkerState,
    request_id: str,
    prompt_ids: list[int],
    first_token: int,
    kv_handle: bytes,
    sampling: dict[str, Any],
    push: Callable[[int, str | None], str],
    metrics: RouterMetrics,
    idle_timeout_s: float | None,
) -> AsyncIterator[tuple[str, str | None]]:
    """Yield (text of the token, finish reason or None) per decoded token; raises `WorkerFailed`."""
    worker.running_sequences += 1
    stream = worker.client.decode(request_id, prompt_ids, first_token, kv_handle, sampling, idle_timeout_s)
    last = time.monotonic()
    try:
        async for token in stream:
            if token.finish_reason == "abort":
                raise server_error(f"decode worker {worker.client.address} aborted the request")
            text = ""
            if token.token_id is not None:
                now = time.monotonic()
                metrics.itl.observe(now - last)
                last = now
                text = push(token.token_id, token.finish_reason)
            yield text, token.finish_reason
            if token.finish_reason is not None:
                return
    except WorkerFailed as exc:
        if exc.worker_down:
            pool.mark_down(worker)
        raise
    finally:
        worker.running_sequences -= 1
        await stream.aclose()


__all__ = ["Event", "Finished", "OpenAIError", "TextDelta", "generate"]
