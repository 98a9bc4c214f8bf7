"""One request through the disaggregated path: prefill, then relay the decode stream; a decode worker lost
mid-stream is replaced and the request resumes from its prompt plus the tokens generated so far.

client ──► router ──ModelInfer──► prefill worker   (first token + KV handle)
              │ first token to the client at once
              └──ModelStreamInfer(handle)──► decode worker ──tokens──► router ──SSE──► client
decode worker lost ──ModelInfer(prompt + generated)──► prefill worker ──handle──► another decode worker
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvrelay_worker.router.errors import OpenAIError, WorkerFailed, server_error
from kvrelay_worker.router.hold import WaitingRoom
from kvrelay_worker.router.kserve import DecodeToken, PrefillResult
from kvrelay_worker.router.logprobs import TokenLogprob
from kvrelay_worker.router.metrics import RouterMetrics
from kvrelay_worker.router.migration import GiveUp, MigrationPolicy, decide, no_decode_worker
from kvrelay_worker.router.pool import WorkerPool, WorkerState
from kvrelay_worker.router.resume import ResumeState
from kvrelay_worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)
PREFILL_ATTEMPTS = 2  # the first try plus one retry on another worker


@dataclass(frozen=True)
class TextDelta:
    """Text to send now, and the logprobs of the tokens accepted with it (when asked).

    A token whose text is held back (an incomplete character, a possible stop string) still comes
    with its logprobs, in a delta whose text may be empty.
    """

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    completion_tokens: int = 0  # generated so far, this delta's included (continuous usage stats)


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens after the first, each given its prefix (asked with `prompt_logprobs`)."""

    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop | length
    num_prompt_tokens: int
    num_completion_tokens: int


Event = PromptLogprobs | TextDelta | Finished


def _delta(text: str, logprobs: TokenLogprob | None, generated: int) -> TextDelta | None:
    """The event for one accepted token: None when there is neither text nor a logprob to send."""
    if logprobs is not None:
        return TextDelta(text, (logprobs,), generated)
    return TextDelta(text, (), generated) if text else None


async def _prefill(
    pool: WorkerPool, metrics: RouterMetrics, request_id: str, prompt_ids: list[int], sampling: dict[str, Any]
) -> PrefillResult:
    """Call the prefill worker that reaches the first token soonest (its queue, the prefix it likely
    holds: routing.choose_prefill); on failure retry once on another one."""
    tried: list[str] = []
    last_error: WorkerFailed | None = None
    for _ in range(PREFILL_ATTEMPTS):
        choice = pool.roles["prefill"].choose_for_prompt(prompt_ids, exclude=tried)
        if choice is None:
            break
        worker = choice.worker
        metrics.routed_prefill(choice.cached_prefix_tokens)
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


async def _resume_prefill(
    pool: WorkerPool, metrics: RouterMetrics, state: ResumeState
) -> PrefillResult | None:
    """Prefill prompt + generated tokens for a resume; None (recompute on decode) if no prefill worker can."""
    input_ids, sampling = state.prefill_inputs()
    try:
        return await _prefill(pool, metrics, state.request_id, input_ids, sampling)
    except OpenAIError as exc:
        log.warning("resume of %s: %s; the decode worker recomputes instead", state.request_id, exc.message)
        return None


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
    migration: MigrationPolicy | None = None,
    prompt_only: bool = False,
    waiting_room: WaitingRoom | None = None,
) -> AsyncIterator[Event]:
    """Yield the prompt's logprobs (when asked), text deltas, then one `Finished`; raises `OpenAIError`
    on failure. `arrival` is monotonic.

    `prompt_only` (echo with max_tokens 0): one prefill with max_tokens 1, for the prompt's logprobs;
    its token is dropped and no decode worker is called. `waiting_room`: held there first while a role
    the request needs has no ready worker (scale to zero).
    """
    policy = migration or MigrationPolicy()
    state = ResumeState.start(request_id, prompt_ids, sampling, tokenizer, stop)
    if waiting_room is not None:
        # Both roles before the prefill: a prompt's KV must not sit in a prefill worker, its lease
        # running, while the request waits for a decode worker to start.
        await waiting_room.until_ready(("prefill",) if prompt_only else ("prefill", "decode"))
    first = await _prefill(pool, metrics, request_id, *state.prefill_inputs())
    if first.prompt_logprobs is not None:
        yield PromptLogprobs(first.prompt_logprobs)
    if prompt_only:
        if first.kv_handle:  # max_tokens 1 ends the request at its first token, which frees its KV
            log.warning(
                "request %s: a max_tokens 1 prefill kept KV (held until its lease expires)", request_id
            )
        yield Finished("length", len(prompt_ids), 0)
        return
    last_token_at = time.monotonic()
    metrics.ttft.observe(last_token_at - arrival)
    metrics.generation_tokens.inc()
    # The first delta goes out even when empty, so the client sees the stream start at once.
    text = state.advance(first.token_id, first.finish_reason or None)
    yield TextDelta(text, (first.logprobs,) if first.logprobs else (), len(state.generated_ids))

    kv_handle, tried = first.kv_handle, []
    failed_at: float | None = None  # when the last decode failure was noticed, until the next token
    via = policy.resume_via
    decode = pool.roles["decode"]
    while not state.done:
        # By the input it is given (the prompt; on a resume, also the tokens generated before): a decode
        # worker still holding its leading blocks fetches only the rest.
        choice = decode.choose_for_stream(state.decode_inputs()[0], exclude=tried)
        if choice is None:
            if state.migrations:
                metrics.migration_failed("no_worker")
            raise no_decode_worker(state.migrations, state.last_failure)
        worker = choice.worker
        metrics.routed_decode(choice.cached_prefix_tokens)
        tried.append(worker.client.address)
        try:
            relay = _relay_decode(pool, worker, state, kv_handle, decode_idle_timeout_s)
            async with contextlib.aclosing(relay):  # closing it cancels the call on the worker
                async for token in relay:
                    if token.token_id is not None:
                        now = time.monotonic()
                        metrics.itl.observe(now - last_token_at)
                        metrics.generation_tokens.inc()
                        last_token_at = now
                        if failed_at is not None:
                            metrics.resumed(via, now - failed_at)
                            failed_at = None
                    text = state.advance(token.token_id, token.finish_reason)
                    if delta := _delta(text, token.logprobs, len(state.generated_ids)):
                        yield delta
                    if state.done:
                        break  # the worker's final response, or a stop string matched here
            if not state.done:
                raise server_error(f"decode stream from {worker.client.address} ended without a finish")
            # It caches the output's blocks too: a next turn that resends this answer finds them there.
            decode.record(worker.client.address, _computed_ids(state))
        except WorkerFailed as exc:
            decision = decide(exc, state.migrations, policy)
            if isinstance(decision, GiveUp):
                if decision.limit_reached:
                    metrics.migration_failed("limit")
                raise decision.error from None
            state.migrations += 1
            state.last_failure = str(exc)
            metrics.migrated(decision.reason)
            log.warning(
                "request %s resumes after %d generated tokens (migration %d): %s",
                request_id, state.position, state.migrations, exc,
            )  # fmt: skip
            failed_at = time.monotonic()
            kv_handle, via = b"", "decode"  # an empty handle: the decode worker recomputes
            if policy.resume_via == "prefill" and (resumed := await _resume_prefill(pool, metrics, state)):
                now = time.monotonic()
                metrics.itl.observe(now - last_token_at)
                metrics.generation_tokens.inc()
                metrics.resumed("prefill", now - failed_at)
                last_token_at, failed_at = now, None
                kv_handle, via = resumed.kv_handle, "prefill"
                text = state.advance(resumed.token_id, resumed.finish_reason or None)
                if delta := _delta(text, resumed.logprobs, len(state.generated_ids)):
                    yield delta

    tail = state.tail()
    if tail:
        yield TextDelta(tail, (), len(state.generated_ids))
    yield Finished(state.final_reason(), len(prompt_ids), len(state.generated_ids))


def _computed_ids(state: ResumeState) -> list[int]:
    """The tokens whose KV the decode worker that finished the stream holds: all but the last generated
    one, which it sampled and never ran through the model."""
    return state.prompt_ids + state.generated_ids[:-1]


async def _relay_decode(
    pool: WorkerPool,
    worker: WorkerState,
    state: ResumeState,
    kv_handle: bytes,
    idle_timeout_s: float | None,
) -> AsyncIterator[DecodeToken]:
    """The decode worker's tokens after the state's last generated one; raises `WorkerFailed`."""
    input_ids, first_token, sampling = state.decode_inputs()
    worker.running_sequences += 1
    client = worker.client
    stream = client.decode(state.request_id, input_ids, first_token, kv_handle, sampling, idle_timeout_s)
    try:
        async for token in stream:
            if token.finish_reason == "abort":
                raise server_error(f"decode worker {worker.client.address} aborted the request")
            yield token
            if token.finish_reason is not None:
                return
    except WorkerFailed as exc:
        if exc.worker_down:
            pool.mark_down(worker)
        raise
    finally:
        worker.running_sequences -= 1
        await stream.aclose()


__all__ = ["Event", "Finished", "OpenAIError", "PromptLogprobs", "TextDelta", "generate"]
