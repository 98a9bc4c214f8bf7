"""OpenAI request models (pydantic) and the pure checks that turn a request into worker sampling params."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvrelay_worker.router.errors import OpenAIError, bad_request

MAX_STOP_STRINGS = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="vLLM extension; 0 = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(value)}")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Content as plain text; only `text` parts are supported."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None


def parse_body(raw: bytes, model_cls: type[BaseModel]) -> Any:
    """Parse and validate a JSON body; every failure becomes a 400 with the offending `param`."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def reject_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse features the router does not implement, rather than silently ignoring them."""
    if req.n != 1:
        raise bad_request("only n=1 is supported", param="n", code="unsupported_value")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            raise bad_request("only best_of=1 is supported", param="best_of", code="unsupported_value")
        if req.echo:
            raise bad_request("echo is not supported", param="echo", code="unsupported_value")
        if req.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs", code="unsupported_value")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")
    else:
        if req.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs", code="unsupported_value")
        if req.tools:
            raise bad_request("tools are not supported", param="tools", code="unsupported_value")
    if req.presence_penalty or req.frequency_penalty:
        raise bad_request("presence/frequency penalties are not supported", param="presence_penalty")


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The single prompt of a completion request: text or token ids (batches are refused)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) == 1:
        return prompt[0]  # type: ignore[return-value]
    raise bad_request("only one prompt per request is supported", param="prompt", code="unsupported_value")


def resolve_max_tokens(
    requested: int | None, num_prompt_tokens: int, max_model_len: int, default: int | None
) -> int:
    """Check prompt + max_tokens against the context length; `default=None` means 'fill the context'."""
    if num_prompt_tokens == 0:
        raise bad_request("the prompt is empty", param="prompt")
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt_tokens} tokens, leaving no room to generate.",
            param="messages",
            code="context_length_exceeded",
        )
    room = max_model_len - num_prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if num_prompt_tokens + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} for "
            "the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if t < 0 or t >= vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt")


def check_model(name: str, served: str) -> None:
    if name != served:
        raise OpenAIError(
            404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found"
        )


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int, stop_token_ids: list[int]
) -> dict[str, Any]:
    """The `SamplingParams` JSON sent to workers (docs/wire-contracts.md section 3)."""
    return {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
        "stop_token_ids": stop_token_ids,
        "ignore_eos": req.ignore_eos,
    }
