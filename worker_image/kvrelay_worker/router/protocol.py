"""OpenAI request models (strict pydantic) and the pure checks that turn a request into sampling params.

What the router accepts is spelled out here: `IMPLEMENTED` is what it honours, `REFUSED` what it answers
with a 400 (unless sent in a form that changes nothing), and any other field is an unrecognized argument.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from kvrelay_worker.router.errors import OpenAIError, bad_request

MAX_STOP_STRINGS = 4
# A completions batch runs each prompt as its own request, all at once: the bound keeps one HTTP request
# from taking the whole worker pool (and its queues) from everyone else.
MAX_PROMPTS = 64
# `n` choices per prompt at most: each is a decode sequence holding its own KV (the prompt's full blocks
# are shared through the prefix cache); prompts x n is bounded by MAX_PROMPTS as well
MAX_N = 16

# What the router honours. Dotted names are fields of an object parameter. `user` is accepted and has no
# effect on the output (OpenAI uses it for abuse monitoring); `top_k`, `ignore_eos`, `min_tokens`,
# `repetition_penalty`, `stop_token_ids` and `structured_outputs` are vLLM extensions (sent with the SDK's
# `extra_body`).
_IMPLEMENTED_COMMON = (
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
    "stream_options.include_usage", "stream_options.continuous_usage_stats",
    "user", "presence_penalty", "frequency_penalty", "logit_bias",
    "top_k", "ignore_eos", "min_tokens", "repetition_penalty", "stop_token_ids", "n",
    "structured_outputs",
)  # fmt: skip
IMPLEMENTED: dict[str, frozenset[str]] = {
    "completions": frozenset({*_IMPLEMENTED_COMMON, "prompt", "logprobs", "echo"}),
    "chat": frozenset({
        *_IMPLEMENTED_COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs",
        "response_format", "tools", "tool_choice", "parallel_tool_calls",
    }),
}  # fmt: skip
MAX_TOP_LOGPROBS = {"completions": 5, "chat": 20}  # OpenAI's bounds
# Of a chat message, only these are honoured (`tool_calls` on assistant turns, `tool_call_id` on tool
# turns), and only these roles.
IMPLEMENTED_MESSAGE_FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id"})
IMPLEMENTED_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Refusal:
    """A parameter the router does not implement: a 400 unless null or in `noop` (forms that do nothing)."""

    message: str
    noop: tuple[Any, ...] = ()
    code: str = "unsupported_parameter"

    def accepts(self, value: Any) -> bool:
        # bool is an int in Python: False must not pass for 0, nor 1 for True.
        return value is None or any(
            value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.noop
        )


def noop_only(message: str, *noop: Any) -> Refusal:
    """A parameter whose default form works (and is accepted): other values are `unsupported_value`."""
    return Refusal(message, noop, "unsupported_value")


def never(message: str) -> Refusal:
    """A parameter the router has nothing for: any non-null value is `unsupported_parameter`."""
    return Refusal(message)


_REFUSED_COMMON: dict[str, Refusal] = {
    "stream_options.include_obfuscation": noop_only(
        "stream obfuscation is not implemented (only false)", False
    ),
}
REFUSED: dict[str, dict[str, Refusal]] = {
    "completions": {
        **_REFUSED_COMMON,
        "best_of": noop_only("only best_of=1 is supported", 1),
        "suffix": noop_only("suffix is not supported (only '')", ""),
    },
    "chat": {
        **_REFUSED_COMMON,
        "functions": noop_only("the deprecated functions API is not supported: use tools (only [])", []),
        "function_call": noop_only("the deprecated functions API is not supported: use tool_choice", "none"),
        "modalities": noop_only("only text output is supported (['text'])", ["text"]),
        "audio": never("audio output is not supported"),
        "store": noop_only("stored completions are not supported (only false)", False),
        "metadata": noop_only("metadata is for stored completions, which are not supported (only {})", {}),
        "service_tier": noop_only("there is one service tier (only 'auto' or 'default')", "auto", "default"),
        "reasoning_effort": noop_only("reasoning is not supported (only 'none')", "none"),
        "verbosity": never("verbosity is not supported"),
        "prediction": never("predicted outputs are not supported"),
        "web_search_options": never("web search is not supported"),
        "moderation": never("moderation is not supported"),
        "prompt_cache_key": never("prompt cache hints are not supported"),
        "prompt_cache_options": never("prompt cache hints are not supported"),
        "prompt_cache_retention": never("prompt cache hints are not supported"),
        "safety_identifier": never("safety_identifier is not supported"),
    },
}
# Fields of a chat message the router refuses (param `messages.<i>.<field>`); role `function` is refused
# as a whole (param `messages.<i>.role`).
REFUSED_MESSAGE_FIELDS: dict[str, Refusal] = {
    "function_call": never("the deprecated function_call is not supported: use tool_calls"),
    "name": never("message names are not supported (the chat template renders only role and content)"),
    "refusal": never("assistant refusals are not supported in messages"),
    "audio": never("audio is not supported"),
}


def refusal_error(param: str, refusal: Refusal) -> OpenAIError:
    what = "value for" if refusal.code == "unsupported_value" else "parameter"
    return bad_request(f"Unsupported {what} '{param}': {refusal.message}.", param, refusal.code)


def invalid_type(expected: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError("invalid_type", "expected {expected}", {"expected": expected, "got": value})


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StrictModel(BaseModel):
    """JSON types as given: no "yes" for a bool, no "2" or 2.0 for an int; unknown fields are refused."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """null for an optional field means 'not given', as in the OpenAI API (SDKs send it)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(StrictModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # refused when true
    # vLLM's extension (GuideLLM sends it): every chunk carries the usage so far; needs include_usage
    continuous_usage_stats: bool = False


class _SamplingFields(StrictModel):
    """Fields shared by completions and chat, implemented or refused (see IMPLEMENTED and REFUSED)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="vLLM extension; 0 or -1 (vLLM's spelling) = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, int] | None = None  # integer biases, as the API types them
    # vLLM extensions
    min_tokens: int = Field(default=0, ge=0, description="EOS, stop ids and stop strings wait this long")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    # vLLM's extension: exactly one of json / regex / choice / grammar (router/structured.py)
    structured_outputs: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        # Keys are token ids written as strings (JSON object keys); checked against the vocabulary later.
        for key, bias in (value or {}).items():
            if not key.isdecimal():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for {key}")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and min(value) < 0:
            raise ValueError("stop_token_ids must be token ids (>= 0)")
        return value

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, value: Any) -> str | list[str] | None:
        if value == "":
            raise ValueError("a stop sequence must not be empty")
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise invalid_type("a string or an array of strings", value)
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(value)}")
        if "" in value:  # it would match at once: refused rather than dropped
            raise ValueError("a stop sequence must not be empty")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo: the prompt's logprobs and no completion (how evaluation harnesses score text)
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    # 0 is not "off" in this API: it asks for the chosen tokens' logprobs, with no alternatives
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS["completions"])
    # Refused unless null or a no-op value (REFUSED["completions"]).
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and (
            all(isinstance(p, str) for p in value)
            or all(_is_token_id(t) for t in value)
            or all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in value)
        ):
            if not value or any(isinstance(p, list) and not p for p in value):
                raise ValueError("the prompt is empty")
            return value
        raise invalid_type(
            "a string, an array of strings, an array of token ids or an array of arrays of token ids", value
        )


class CalledFunction(StrictModel):
    name: str
    arguments: str  # JSON text, as the API writes it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON object written as a string") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object written as a string")
        return value


class AssistantToolCall(StrictModel):
    """A call an earlier assistant turn made (sent back in the next request's history)."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(StrictModel):
    """One message; `content` is checked per role in `reject_unsupported` (after the refused fields)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, str]] | None = None
    # Refused (REFUSED_MESSAGE_FIELDS); typed loosely, since any non-null value is refused.
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None
    # Refused (REFUSED_MESSAGE_FIELDS); typed loosely, since any non-null value is refused.
    name: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None

    @field_validator("content", mode="plain")
    @classmethod
    def _text_content(cls, value: Any) -> str | list[dict[str, str]] | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise invalid_type("a string or an array of text parts", value)
        if not value:
            raise ValueError("content must not be an empty array")
        for i, part in enumerate(value):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
                and set(part) == {"type", "text"}
            ):
                raise PydanticCustomError(
                    "unsupported_value",
                    "part {i}: only text parts (type 'text', with a string 'text') are supported",
                    {"i": i},
                )
        return value

    def text(self) -> str:
        """Content as plain text (text parts joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS["chat"])
    # checked by router/tools.py and router/structured.py, which name the offending field
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: Any = None
    # Refused unless null or a no-op value (REFUSED["chat"]).
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for and the param that asked (`max_completion_tokens` first)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


_TYPE_ERRORS = {
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return "an array" if isinstance(value, list) else "an object"


def _error_from(error: ErrorDetails) -> OpenAIError:
    """One pydantic error as OpenAI words it, naming the field (dotted: `messages.0.content`)."""
    param = ".".join(str(p) for p in error["loc"]) or None
    kind = error["type"]
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind in _TYPE_ERRORS or kind == "invalid_type":
        ctx = error.get("ctx") or {}
        expected = ctx.get("expected") if kind == "invalid_type" else _TYPE_ERRORS[kind]
        got = _json_type(ctx.get("got") if kind == "invalid_type" else error["input"])
        message = f"Invalid type for '{param}': expected {expected}, but got {got} instead."
        return bad_request(message, param, "invalid_type")
    if kind == "unsupported_value":
        return bad_request(f"Unsupported value for '{param}': {error['msg']}.", param, kind)
    detail = str(error["ctx"]["error"]) if kind == "value_error" else error["msg"]
    return bad_request(f"Invalid value for '{param}': {detail}", param, "invalid_value")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model_cls: type[BaseModel]) -> Any:
    """Parse and validate a JSON body; every failure becomes a 400 with the offending `param`."""
    try:
        data = json.loads(raw, parse_constant=_no_constants)  # NaN and Infinity are not JSON
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _error_from(exc.errors()[0]) from None


def _lookup(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
    return obj


def reject_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse what the router does not implement (REFUSED), rather than silently ignoring it."""
    kind = "completions" if isinstance(req, CompletionRequest) else "chat"
    for name, refusal in REFUSED[kind].items():
        if not refusal.accepts(_lookup(req, name)):
            raise refusal_error(name, refusal)
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "stream_options is only allowed when stream is true", param="stream_options", code="invalid_value"
        )
    options = req.stream_options
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        raise bad_request(
            "Invalid value for 'stream_options.continuous_usage_stats': it needs include_usage true",
            param="stream_options.continuous_usage_stats",
            code="invalid_value",
        )
    if isinstance(req, CompletionRequest) and req.max_tokens == 0 and not req.echo:
        raise bad_request(
            "Invalid value for 'max_tokens': it must be at least 1 (0 only with echo, for the prompt alone)",
            param="max_tokens",
            code="invalid_value",
        )
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request(
                "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is given",
                param="top_logprobs",
                code="invalid_value",
            )
        _check_messages(req.messages)
        both = None not in (req.max_tokens, req.max_completion_tokens)
        if both and req.max_tokens != req.max_completion_tokens:
            raise bad_request(
                "max_tokens and max_completion_tokens differ: give one of them",
                param="max_tokens",
                code="invalid_value",
            )


def _check_messages(messages: list[ChatMessage]) -> None:
    """Each message on its own first (role, fields, content), then how tool calls and answers pair up."""
    for i, message in enumerate(messages):
        _check_message(i, message)
    call_ids: set[str] = set()  # of the assistant turns so far: a tool message answers one of them
    for i, message in enumerate(messages):
        if message.tool_calls:
            # as OpenAI: every call is answered by the tool messages right after it
            answered = {m.tool_call_id for m in _takewhile_tool(messages[i + 1 :])}
            missing = [c.id for c in message.tool_calls if c.id not in answered]
            if missing:
                param = f"messages.{i}.tool_calls"
                raise bad_request(
                    f"Invalid value for '{param}': an assistant message with tool_calls must be followed by "
                    f"tool messages answering each call; no answer to {', '.join(missing)}",
                    param,
                    "invalid_value",
                )
            call_ids.update(c.id for c in message.tool_calls)
        if message.tool_call_id is not None and message.tool_call_id not in call_ids:
            param = f"messages.{i}.tool_call_id"
            raise bad_request(
                f"Invalid value for '{param}': {message.tool_call_id!r} answers no tool call of an earlier "
                "assistant message",
                param,
                "invalid_value",
            )


def _check_message(i: int, message: ChatMessage) -> None:
    if message.role not in IMPLEMENTED_ROLES:
        raise bad_request(
            f"Unsupported value for 'messages.{i}.role': the deprecated {message.role} role is not "
            "supported (use tool).",
            param=f"messages.{i}.role",
            code="unsupported_value",
        )
    for name, refusal in REFUSED_MESSAGE_FIELDS.items():
        if not refusal.accepts(getattr(message, name)):
            raise refusal_error(f"messages.{i}.{name}", refusal)
    if message.tool_calls is not None and message.role != "assistant":
        raise bad_request(
            f"Invalid value for 'messages.{i}.tool_calls': only assistant messages make tool calls",
            f"messages.{i}.tool_calls",
            "invalid_value",
        )
    if (message.tool_call_id is None) == (message.role == "tool"):
        param = f"messages.{i}.tool_call_id"
        if message.role == "tool":
            raise bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
        raise bad_request(
            f"Invalid value for '{param}': only tool messages answer a tool call", param, "invalid_value"
        )
    if message.content is None and not message.tool_calls:
        param = f"messages.{i}.content"
        raise bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _takewhile_tool(messages: list[ChatMessage]) -> list[ChatMessage]:
    out = []
    for m in messages:
        if m.role != "tool":
            break
        out.append(m)
    return out


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request, each text or token ids (OpenAI's batch form is a list of them)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if len(prompt) * req.n > MAX_PROMPTS:
        raise bad_request(
            f"Invalid value for 'prompt': at most {MAX_PROMPTS} choices per request (prompts x n), got "
            f"{len(prompt)} x {req.n}",
            param="prompt",
            code="invalid_value",
        )
    return list(prompt)  # type: ignore[arg-type]


def resolve_max_tokens(
    requested: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    default: int | None,
    prompt_param: str = "prompt",
    max_tokens_param: str = "max_tokens",
) -> int:
    """Check prompt + max_tokens against the context length; `default=None` means 'fill the context'."""
    if num_prompt_tokens == 0:
        raise bad_request(
            f"Invalid value for '{prompt_param}': the prompt is empty", prompt_param, "invalid_value"
        )
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt_tokens} tokens, leaving no room to generate.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = max_model_len - num_prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if num_prompt_tokens + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} for "
            f"the completion). Reduce the prompt or {max_tokens_param}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return requested


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if t < 0 or t >= vocab_size]
    if bad:
        message = f"Invalid value for 'prompt': token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
        raise bad_request(message, "prompt", "invalid_value")


def check_model(name: str, served: str) -> None:
    if name != served:
        raise OpenAIError(
            404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found"
        )


def check_sampling_ids(req: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> None:
    """Token ids in logit_bias and stop_token_ids must be in the vocabulary; min_tokens within max_tokens."""
    for param, ids in (
        ("logit_bias", [int(k) for k in req.logit_bias or {}]),
        ("stop_token_ids", req.stop_token_ids),
    ):
        bad = [t for t in ids or () if t >= vocab_size]
        if bad:
            message = (
                f"Invalid value for '{param}': token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
            )
            raise bad_request(message, param=param, code="invalid_value")


def logprobs_asked(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Top alternatives wanted per generated token (0: the token's own logprob only); None: no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    stop_token_ids: list[int],
    grammar: str | None = None,
) -> dict[str, Any]:
    """The `SamplingParams` JSON sent to workers (docs/wire-contracts.md section 3).

    Penalties, logit_bias, min_tokens and logprobs are sent only when set: a worker that predates them
    still takes requests that do not use them. `max_tokens` 0 (echo alone) runs the prefill with 1,
    whose token is dropped; with logprobs it also asks the prompt's (`prompt_logprobs`).
    """
    if grammar is not None and req.ignore_eos:
        raise bad_request(
            "ignore_eos cannot be combined with structured output or a forced tool call: the grammar ends "
            "the answer on EOS",
            param="ignore_eos",
            code="invalid_value",
        )
    if req.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
            code="invalid_value",
        )
    params: dict[str, Any] = {
        "max_tokens": max(max_tokens, 1),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": max(req.top_k, 0),
        "seed": req.seed,
        "stop_token_ids": [
            *stop_token_ids,
            *(t for t in req.stop_token_ids or () if t not in stop_token_ids),
        ],
        "ignore_eos": req.ignore_eos,
    }
    optional = {
        "presence_penalty": (req.presence_penalty, 0.0),
        "frequency_penalty": (req.frequency_penalty, 0.0),
        "repetition_penalty": (req.repetition_penalty, 1.0),
        "min_tokens": (req.min_tokens, 0),
    }
    params |= {name: value for name, (value, default) in optional.items() if value != default}
    if req.logit_bias:
        params["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
    if grammar is not None:
        params["grammar"] = grammar
    if (logprobs := logprobs_asked(req)) is not None:
        params["logprobs"] = logprobs
        if isinstance(req, CompletionRequest) and req.echo:
            params["prompt_logprobs"] = logprobs
    return params
