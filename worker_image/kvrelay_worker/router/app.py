"""The OpenAI-compatible HTTP app: request parsing, SSE framing, errors, auth, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvrelay_worker.router.chat import chat_prompt
from kvrelay_worker.router.config import RouterConfig
from kvrelay_worker.router.discovery import Discovery
from kvrelay_worker.router.errors import OpenAIError
from kvrelay_worker.router.generate import Event, Finished, PromptLogprobs, TextDelta, generate
from kvrelay_worker.router.hold import HoldPolicy, WaitingRoom
from kvrelay_worker.router.logprobs import TextOffsets, TokenLogprob, chat_logprobs, completion_logprobs
from kvrelay_worker.router.metrics import RouterMetrics
from kvrelay_worker.router.migration import MigrationPolicy
from kvrelay_worker.router.pool import WorkerPool
from kvrelay_worker.router.prefix_index import PrefixIndex
from kvrelay_worker.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_model,
    check_sampling_ids,
    check_token_ids,
    completion_prompts,
    logprobs_asked,
    parse_body,
    reject_unsupported,
    resolve_max_tokens,
    sampling_params,
)
from kvrelay_worker.router.responses import ResponseWriter, renamed, to_chat
from kvrelay_worker.router.responses import parse_request as parse_response_request
from kvrelay_worker.router.structured import structured_outputs_grammar
from kvrelay_worker.router.tools import Tool, ToolCall, ToolCallParser
from kvrelay_worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.2
USAGE_SO_FAR = "_completion_tokens"  # a streamed choice's token count, taken off before the chunk is sent


class ClientGone(Exception):
    """The HTTP client went away before the answer was ready."""


async def _until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it (and so the worker calls under it) if the client disconnects."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class RouterState:
    """Everything a request handler needs; built once per app."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, pool: WorkerPool) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.metrics = RouterMetrics(config.served_model_name)
        self.migration = MigrationPolicy(config.max_migrations, config.resume_via)
        self.waiting_room = WaitingRoom(
            pool, HoldPolicy(config.max_waiting_requests, config.max_wait_s), self.metrics
        )
        self.created = int(time.time())


def _chunk(
    kind: str, request_id: str, model: str, created: int, index: int = 0, **choice: Any
) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [{"index": index, "logprobs": None, **choice}],
    }


def _usage(prompt: int, dones: Sequence[Finished]) -> dict[str, int]:
    """Usage of a request: its prompts' tokens (each counted once, whatever `n`), its choices' tokens."""
    completion = sum(d.num_completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _gather(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """All results in order; the first failure cancels the rest (asyncio.gather would leave them running)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        await _cancel_all(tasks)


async def _cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel the tasks and wait until each has ended, whatever it ended with."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def _merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, each with its stream's index; a failure ends them all."""
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                yield i, item
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        await _cancel_all(pending)
        for stream in streams:
            with contextlib.suppress(BaseException):
                await stream.aclose()  # type: ignore[attr-defined]


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Answer:
    """How one request's choice is written: chat or completion, the echoed prompt, logprobs.

    Completions' `text_offset` counts characters from the start of the prompt, echoed or not (as
    OpenAI's legacy API does), so calls must come in text order: the prompt, then the tokens.
    """

    kind: str
    tokenizer: Tokenizer
    logprobs: int | None  # alternatives per token; None: no logprobs
    prompt_ids: list[int]
    prompt_text: str = ""  # completions: the prompt as given (or decoded from its ids)
    echo: bool = False
    tools: Sequence[Tool] | None = None  # chat: parse the answer for calls to these
    offsets: TextOffsets = field(init=False)
    parser: ToolCallParser | None = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = TextOffsets(self.tokenizer, 0 if self.echo else len(self.prompt_text))
        self.parser = ToolCallParser(self.tools) if self.tools else None

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's `tool_calls` when the answer ended (not cut) after calling tools."""
        return "tool_calls" if self.parser and self.parser.calls and reason == "stop" else reason

    def token_logprobs(self, tokens: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """The `logprobs` object for these generated tokens (null when not asked)."""
        if self.logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, tokens)
        return completion_logprobs(self.tokenizer, tokens, self.offsets)

    def prompt(self, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        """Choice fields of the echoed prompt: its text, and its tokens' logprobs (the first has none)."""
        fields: dict[str, Any] = {"text": self.prompt_text, "logprobs": None}
        if self.logprobs is not None:
            entries = [self.prompt_ids[0], *(logprobs or ())]
            fields["logprobs"] = completion_logprobs(self.tokenizer, entries, self.offsets)
        self.offsets.restart(len(self.prompt_text))  # the prompt as given, whatever its tokens decode to
        return fields

    def delta(self, event: TextDelta) -> list[dict[str, Any]]:
        """Choice fields of one streamed delta: its text and its tokens' logprobs, then any tool call it
        completed (empty when a parser holds the text back and no logprobs were asked)."""
        if self.parser is None:
            text = {"delta": {"content": event.text}} if self.kind == "chat" else {"text": event.text}
            return (
                [{**text, "logprobs": self.token_logprobs(event.logprobs)}]
                if event.text or event.logprobs
                else []
            )
        content, calls = self.parser.feed(event.text)
        return self._tool_deltas(content, calls, event.logprobs)

    def _tool_deltas(
        self, content: str, calls: list[ToolCall], logprobs: Sequence[TokenLogprob] = ()
    ) -> list[dict[str, Any]]:
        out = []
        if content or logprobs:
            out.append({"delta": {"content": content}, "logprobs": self.token_logprobs(logprobs)})
        first = len(self.parser.calls) - len(calls) if self.parser else 0
        out += [
            {"delta": {"tool_calls": [{"index": first + k, **call.as_json()}]}, "logprobs": None}
            for k, call in enumerate(calls)
        ]
        return out

    def last_deltas(self) -> list[dict[str, Any]]:
        """What a tool-call parser still held at the end of the answer."""
        if self.parser is None:
            return []
        return self._tool_deltas(*self.parser.finish())

    def whole(
        self, prompt: Sequence[TokenLogprob] | None, text: str, tokens: Sequence[TokenLogprob]
    ) -> dict[str, Any]:
        """Choice fields of a non-streamed answer."""
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.parser is not None:
                head, _ = self.parser.feed(text)
                tail, _ = self.parser.finish()
                message["content"] = (head + tail).strip() or None if self.parser.calls else head + tail
                if self.parser.calls:
                    message["tool_calls"] = [c.as_json() for c in self.parser.calls]
            return {"message": message, "logprobs": self.token_logprobs(tokens)}
        if not self.echo:
            return {"text": text, "logprobs": self.token_logprobs(tokens)}
        head = self.prompt(prompt)
        tail = self.token_logprobs(tokens)
        logprobs = None if tail is None else {k: v + tail[k] for k, v in head["logprobs"].items()}
        return {"text": head["text"] + text, "logprobs": logprobs}


async def _choice_chunks(
    answer: Answer, first: Event, events: AsyncIterator[Event]
) -> AsyncIterator[dict[str, Any] | Finished]:
    """One choice's streamed fields in order, then its `Finished` (for usage); closes `events` when done."""
    try:
        if answer.kind == "chat":
            yield {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        event: Event | None = first
        if answer.echo:  # the prompt goes first, with its logprobs when asked
            prompt = None
            if isinstance(event, PromptLogprobs):
                prompt, event = event.logprobs, await anext(events, None)
            yield {**answer.prompt(prompt), "finish_reason": None}
        while event is not None:
            if isinstance(event, PromptLogprobs):
                pass  # asked only with echo, and sent above
            elif isinstance(event, TextDelta):
                # A token whose text is held back still gets its chunk when its logprobs were asked.
                for fields in answer.delta(event):
                    yield {**fields, "finish_reason": None, USAGE_SO_FAR: event.completion_tokens}
            else:
                for fields in answer.last_deltas():
                    yield {**fields, "finish_reason": None}
                last = {"delta": {}} if answer.kind == "chat" else {"text": ""}
                yield {**last, "finish_reason": answer.finish_reason(event.finish_reason)}
                yield event
                return
            event = await anext(events, None)
        raise OpenAIError(500, "generation ended without a finish", "server_error")
    finally:
        await events.aclose()


async def _stream_body(
    state: RouterState,
    kind: str,
    request_id: str,
    choices: list[AsyncIterator[dict[str, Any] | Finished]],
    include_usage: bool,
    prompt_tokens: int,
    continuous_usage: bool = False,
) -> AsyncIterator[bytes]:
    """SSE frames for one request, its choices' chunks interleaved as they come; a failure mid-stream
    becomes an `{"error": ...}` event (the other choices cancelled), never a hang."""
    model, created = state.config.served_model_name, int(time.time())
    # With include_usage every chunk carries "usage": null and one last chunk the totals (OpenAI's shape).
    usage_null = {"usage": None} if include_usage else {}
    merged = _merged(choices)
    finished: list[Finished] = []
    so_far = [0] * len(choices)  # completion tokens per choice, for continuous usage stats
    status = "cancelled"
    try:
        async for index, item in merged:
            if isinstance(item, Finished):
                finished.append(item)
                continue
            so_far[index] = max(so_far[index], item.pop(USAGE_SO_FAR, 0))
            usage = usage_null
            if continuous_usage:
                completion = sum(so_far)
                usage = {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                   "total_tokens": prompt_tokens + completion}}  # fmt: skip
            yield _sse({**_chunk(kind, request_id, model, created, index, **item), **usage})
        if len(finished) != len(choices):
            raise OpenAIError(500, "generation ended without a finish", "server_error")
        if include_usage:
            usage = _usage(prompt_tokens, finished)
            yield _sse({**_chunk(kind, request_id, model, created), "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
        status = "success"
    except OpenAIError as exc:
        status = "server_error"
        log.warning("request %s failed mid-stream: %s", request_id, exc.message)
        yield _sse(exc.body())
    except Exception as exc:  # a bug must still end the stream with an error event, not a cut connection
        status = "server_error"
        log.exception("request %s failed mid-stream", request_id)
        yield _sse(OpenAIError(500, f"internal error: {exc}", "server_error").body())
    finally:
        state.metrics.request_done(status)
        await merged.aclose()


@dataclass
class _Collected:
    prompt: tuple[TokenLogprob, ...] | None
    text: str
    tokens: list[TokenLogprob]
    done: Finished


async def _collect(events: AsyncIterator[Event]) -> _Collected:
    prompt: tuple[TokenLogprob, ...] | None = None
    parts: list[str] = []
    tokens: list[TokenLogprob] = []
    async for event in events:
        if isinstance(event, PromptLogprobs):
            prompt = event.logprobs
        elif isinstance(event, TextDelta):
            parts.append(event.text)
            tokens.extend(event.logprobs)
        else:
            return _Collected(prompt, "".join(parts), tokens, event)
    raise OpenAIError(500, "generation ended without a finish", "server_error")


@dataclass(frozen=True)
class Prompt:
    """One prompt to generate from: its ids, its text (completions: echoed, offsets count from it), budget."""

    ids: list[int]
    max_tokens: int
    text: str = ""


def _after_first(
    leader: AsyncIterator[Event], followers: list[AsyncIterator[Event]]
) -> list[AsyncIterator[Event]]:
    """The `n` choices of one prompt: the followers start once the leader has its first token.

    By then the leader's prefill has put the prompt's full blocks in the prefill worker's prefix cache,
    so the followers (routed there by prefix affinity) compute only the prompt's last partial block: one
    prefill, `n` decodes, whose decode workers share the prompt's blocks the same way.
    """
    started = asyncio.Event()

    async def lead() -> AsyncIterator[Event]:
        try:
            async for event in leader:
                started.set()
                yield event
        finally:
            started.set()
            await leader.aclose()

    async def follow(stream: AsyncIterator[Event]) -> AsyncIterator[Event]:
        try:
            await started.wait()
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    return [lead(), *(follow(f) for f in followers)]


async def _serve(
    state: RouterState,
    request: Request,
    req: CompletionRequest | ChatCompletionRequest,
    kind: str,
    prompts: list[Prompt],
    arrival: float,
    grammar: str | None = None,
    tools: Sequence[Tool] | None = None,
) -> Response:
    """Run one request, `n` choices per prompt, all at once; `max_tokens` 0 (echo) answers with the prompt.

    Choice `i * n + j` is prompt i's j-th; with a `seed`, choice j draws with `seed + j` (the same seed
    for all would give `n` copies of one answer).
    """
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    request_id = prefix + uuid.uuid4().hex
    n = req.n
    stop_ids = [] if req.ignore_eos else state.tokenizer.eos_token_ids
    # All sampling checks first: no prompt starts generating if another one's parameters are refused.
    samplings = [sampling_params(req, p.max_tokens, stop_ids, grammar) for p in prompts]
    echo = isinstance(req, CompletionRequest) and req.echo
    asked = logprobs_asked(req)
    answers = [
        Answer(kind, state.tokenizer, asked, p.ids, p.text, echo, tools) for p in prompts for _ in range(n)
    ]
    single = len(answers) == 1
    streams: list[AsyncIterator[Event]] = []
    for i, (p, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        state.metrics.prompt_tokens.inc(len(p.ids))
        choices = []
        for j in range(n):
            seeded = (
                sampling if j == 0 or sampling["seed"] is None else {**sampling, "seed": sampling["seed"] + j}
            )
            # Each choice is its own worker request (routing, KV relay, migration), under its own id.
            choices.append(
                generate(
                    state.pool,
                    state.tokenizer,
                    state.metrics,
                    request_id if single else f"{request_id}-{i * n + j}",
                    p.ids,
                    seeded,
                    req.stop_strings(),
                    arrival,
                    state.config.decode_idle_timeout_s,
                    state.migration,
                    prompt_only=p.max_tokens == 0,
                    waiting_room=state.waiting_room,
                )
            )
        streams += choices if n == 1 else _after_first(choices[0], choices[1:])
    prompt_tokens = sum(len(p.ids) for p in prompts)
    if req.stream:
        # Wait for every first token before answering 200, so a prefill failure is still a proper HTTP error.
        try:
            firsts = await _until_disconnect(request, _gather([anext(e) for e in streams]))
        except BaseException:
            for events in streams:
                await events.aclose()
            raise
        options = req.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        choices = [_choice_chunks(a, f, e) for a, f, e in zip(answers, firsts, streams, strict=True)]
        body = _stream_body(state, kind, request_id, choices, include_usage, prompt_tokens, continuous)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        got = await _until_disconnect(request, _gather([_collect(e) for e in streams]))
    finally:
        for events in streams:
            await events.aclose()
    state.metrics.request_done("success")
    choices_json = [
        {
            "index": i,
            **answer.whole(g.prompt, g.text, g.tokens),
            "finish_reason": answer.finish_reason(g.done.finish_reason),
        }
        for i, (answer, g) in enumerate(zip(answers, got, strict=True))
    ]
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return JSONResponse(
        {
            "id": request_id,
            "object": obj,
            "created": int(time.time()),
            "model": state.config.served_model_name,
            "choices": choices_json,
            "usage": _usage(prompt_tokens, [g.done for g in got]),
        }
    )


async def _serve_response(state: RouterState, request: Request, raw: bytes, arrival: float) -> Response:
    """One `/v1/responses` request: checked and run as the chat request it is, written as a Response."""
    req = parse_response_request(raw)
    check_model(req.model, state.config.served_model_name)
    chat_req, origins = to_chat(req)
    try:
        check_sampling_ids(chat_req, state.tokenizer.vocab_size)
        chat = chat_prompt(chat_req, state.tokenizer)
        requested, param = chat_req.requested_max_tokens()
        max_tokens = resolve_max_tokens(
            requested, len(chat.ids), state.config.max_model_len, None, "messages", param
        )
        sampling = sampling_params(chat_req, max_tokens, state.tokenizer.eos_token_ids, chat.grammar)
    except OpenAIError as exc:
        raise renamed(exc, origins) from None
    state.metrics.prompt_tokens.inc(len(chat.ids))
    worker_request_id = "resp-" + uuid.uuid4().hex
    events = generate(
        state.pool, state.tokenizer, state.metrics, worker_request_id, chat.ids, sampling, [], arrival,
        state.config.decode_idle_timeout_s, state.migration, waiting_room=state.waiting_room,
    )  # fmt: skip
    writer = ResponseWriter(req, state.config.served_model_name)
    parser = ToolCallParser(chat.tools) if chat.tools else None

    def split(text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        if parser is None:
            return text, []
        content, calls = parser.feed(text)
        if final:
            tail, more = parser.finish()
            content, calls = content + tail, calls + more
        return content, calls

    if not req.stream:
        try:
            got = await _until_disconnect(request, _collect(events))
        finally:
            await events.aclose()
        content, calls = split(got.text, final=True)
        writer.text(content.strip() if calls else content)
        writer.calls(calls)
        state.metrics.request_done("success")
        return JSONResponse(
            writer.whole(got.done.finish_reason, len(chat.ids), got.done.num_completion_tokens)
        )
    try:  # the first token before the 200, so a prefill failure is still an HTTP error
        first = await _until_disconnect(request, anext(events))
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        status = "cancelled"
        try:
            for frame in writer.start():
                yield frame
            event: Event | None = first
            while event is not None:
                if isinstance(event, TextDelta):
                    content, calls = split(event.text)
                    for frame in [*writer.text(content), *writer.calls(calls)]:
                        yield frame
                elif isinstance(event, Finished):
                    content, calls = split("", final=True)
                    frames = [*writer.text(content), *writer.calls(calls)]
                    frames += writer.finish(event.finish_reason, len(chat.ids), event.num_completion_tokens)
                    for frame in frames:
                        yield frame
                    status = "success"
                    return
                event = await anext(events, None)
            raise OpenAIError(500, "generation ended without a finish", "server_error")
        except OpenAIError as exc:
            status = "server_error"
            yield _sse({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})
        finally:
            state.metrics.request_done(status)
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _completion_prompt(state: RouterState, req: CompletionRequest, prompt: str | list[int]) -> Prompt:
    """One completions prompt checked (vocabulary, context length) and tokenized."""
    if isinstance(prompt, str):
        ids = state.tokenizer.encode(prompt)
    else:
        check_token_ids(prompt, state.tokenizer.vocab_size)
        ids = prompt
    max_tokens = resolve_max_tokens(
        req.max_tokens, len(ids), state.config.max_model_len, DEFAULT_COMPLETION_MAX_TOKENS, "prompt"
    )
    # Echoed, and where text offsets count from: the prompt as given (ids: decoded).
    text = prompt if isinstance(prompt, str) else state.tokenizer.decode(ids)
    return Prompt(ids, max_tokens, text)


def _check_api_key(config: RouterConfig, request: Request) -> None:
    if config.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), config.api_key.get_secret_value().encode()):
        raise OpenAIError(
            401, "Incorrect or missing API key.", "invalid_request_error", None, "invalid_api_key"
        )


def _prefix_index(config: RouterConfig, weight: float) -> PrefixIndex | None:
    """One role's record of what its workers likely cache; none when its weight turns it off."""
    return PrefixIndex(config.kv_block_size, config.prefix_index_blocks) if weight else None


def create_app(
    config: RouterConfig,
    discovery: Discovery,
    tokenizer: Tokenizer | None = None,
    pool: WorkerPool | None = None,
) -> FastAPI:
    """Build the router app; discovery feeds the pool's worker addresses while the app runs."""
    if pool is None:
        pool = WorkerPool(
            config.health_interval_s,
            prefix=_prefix_index(config, config.prefix_weight),
            prefix_weight=config.prefix_weight,
            decode_prefix=_prefix_index(config, config.decode_prefix_weight),
            decode_prefix_weight=config.decode_prefix_weight,
        )
    state = RouterState(config, tokenizer or Tokenizer.from_dir(config.model_dir), pool)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await discovery.start(pool)
        pool.start()
        try:
            yield
        finally:
            await discovery.stop()
            await pool.close()

    app = FastAPI(title="kvrelay router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = state

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        if request.url.path.startswith("/v1/") and exc.status != 401:
            state.metrics.request_done("client_error" if exc.status < 500 else "server_error")
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code).body()
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        if request.url.path.startswith("/v1/"):
            state.metrics.request_done("server_error")
        body = OpenAIError(500, f"internal error: {exc}", "server_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, __: ClientGone) -> Response:
        state.metrics.request_done("cancelled")
        return Response(status_code=499)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = pool.ready()
        workers = {
            role: {
                a: {
                    "healthy": w.healthy,
                    "running": w.running_sequences,
                    "queued_tokens": w.queued_prefill_tokens,
                }
                for a, w in p.workers.items()
            }
            for role, p in pool.roles.items()
        }
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "workers": workers},
            status_code=200 if ready else 503,
        )

    @app.get("/ready")
    async def accepting() -> JSONResponse:
        # The router's readiness probe: it takes requests once every role has a ready worker, or at
        # once when it holds requests for one (a role scaled to zero must not take the router away).
        missing = state.waiting_room.missing(("prefill", "decode"))
        holding = state.waiting_room.policy.enabled
        body = {"status": "ok" if not missing or holding else "unavailable", "no_ready_worker": missing}
        return JSONResponse(body, status_code=200 if not missing or holding else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_api_key(config, request)
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "kvrelay",
            "max_model_len": config.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        arrival = time.monotonic()
        _check_api_key(config, request)
        return await _serve_response(state, request, await request.body(), arrival)

    @app.api_route("/v1/responses/{rest:path}", methods=["GET", "POST", "DELETE"])
    async def stored_responses(request: Request) -> Response:
        # Retrieve, cancel, delete, input items: all about stored responses, and none is stored.
        _check_api_key(config, request)
        raise OpenAIError(
            404, "Responses are not stored, so there is none to retrieve, cancel or delete.",
            "invalid_request_error", None, "not_found",
        )  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        _check_api_key(config, request)
        req = parse_body(await request.body(), CompletionRequest)
        check_model(req.model, config.served_model_name)
        reject_unsupported(req)
        check_sampling_ids(req, state.tokenizer.vocab_size)
        given = completion_prompts(req)
        prompts = []
        for i, prompt in enumerate(given):
            try:
                prompts.append(_completion_prompt(state, req, prompt))
            except OpenAIError as exc:
                if len(given) == 1:
                    raise
                # Which prompt of the list: all are checked before any of them starts generating.
                raise OpenAIError(
                    exc.status, f"prompt {i}: {exc.message}", exc.type, exc.param, exc.code
                ) from None
        grammar = structured_outputs_grammar(req.structured_outputs)
        return await _serve(state, request, req, "completion", prompts, arrival, grammar)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        _check_api_key(config, request)
        req = parse_body(await request.body(), ChatCompletionRequest)
        check_model(req.model, config.served_model_name)
        reject_unsupported(req)
        check_sampling_ids(req, state.tokenizer.vocab_size)
        chat = chat_prompt(req, state.tokenizer)
        requested, param = req.requested_max_tokens()
        max_tokens = resolve_max_tokens(
            requested, len(chat.ids), config.max_model_len, None, "messages", param
        )
        prompts = [Prompt(chat.ids, max_tokens)]
        return await _serve(state, request, req, "chat", prompts, arrival, chat.grammar, chat.tools)

    return app
