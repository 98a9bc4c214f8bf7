"""The Responses API (`/v1/responses`) on the chat path: text and function tools, streaming or not.

A request becomes a chat completion request (instructions and input items as messages, `text.format` as
`response_format`, flat function tools as chat tools) and is checked by the same rules, its errors naming
the Responses field; the answer is written as Response output items (a message, function calls). Nothing
is stored: `previous_response_id`, `conversation` and `store: true` are refused, so a client sends the
whole conversation as input, as with chat.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from kvrelay_worker.router.errors import OpenAIError, bad_request
from kvrelay_worker.router.protocol import (
    ChatCompletionRequest,
    Refusal,
    StrictModel,
    invalid_type,
    never,
    noop_only,
    parse_body,
    refusal_error,
    reject_unsupported,
)
from kvrelay_worker.router.tools import ToolCall

# Honoured, as the chat fields they become; `metadata` is echoed in the Response, `user` has no effect.
IMPLEMENTED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "text",
        "text.format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "metadata",
        "user",
    }
)
REFUSED: dict[str, Refusal] = {
    "store": noop_only("responses are not stored (only false): send the whole conversation as input", False),
    "previous_response_id": never("responses are not stored: send the whole conversation as input"),
    "conversation": never("conversations are not stored: send the whole conversation as input"),
    "background": noop_only("background responses are not supported (only false)", False),
    "include": noop_only("there is no extra output to include (only [])", []),
    "reasoning": never("reasoning is not supported"),
    "top_logprobs": noop_only(
        "logprobs are not offered on /v1/responses (only 0): use /v1/chat/completions", 0
    ),
    "truncation": noop_only("a prompt over the context is a 400 (only 'disabled')", "disabled"),
    "max_tool_calls": never("max_tool_calls is not supported"),
    "prompt": never("stored prompt templates are not supported"),
    "prompt_cache_key": never("prompt cache hints are not supported"),
    "prompt_cache_options": never("prompt cache hints are not supported"),
    "prompt_cache_retention": never("prompt cache hints are not supported"),
    "safety_identifier": never("safety_identifier is not supported"),
    "service_tier": noop_only("there is one service tier (only 'auto' or 'default')", "auto", "default"),
    "stream_options": noop_only("stream obfuscation is not implemented", {"include_obfuscation": False}),
    "text.verbosity": never("verbosity is not supported"),
    "access_programs": never("access programs are not supported"),
    "context_management": never("context management is not supported"),
    "image": never("image generation is not supported"),
    "moderation": never("moderation is not supported"),
}
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")


class TextOptions(StrictModel):
    format: dict[str, Any] | None = None
    verbosity: Any = None  # refused


class ResponsesRequest(StrictModel):
    model: str
    input: str | list[dict[str, Any]]

    @field_validator("input", mode="plain")
    @classmethod
    def _input(cls, value: Any) -> str | list[dict[str, Any]]:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(i, dict) for i in value)):
            return value
        raise invalid_type("a string or an array of input items", value)

    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    text: TextOptions | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Refused unless null or a no-op value (REFUSED); typed loosely, the refusal names them.
    store: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    include: Any = None
    reasoning: Any = None
    top_logprobs: Any = None
    truncation: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None
    service_tier: Any = None
    stream_options: Any = None
    access_programs: Any = None
    context_management: Any = None
    image: Any = None
    moderation: Any = None


def parse_request(raw: bytes) -> ResponsesRequest:
    """Parse, then refuse what is not implemented (the 400 names the Responses field)."""
    req: ResponsesRequest = parse_body(raw, ResponsesRequest)
    for name, refusal in REFUSED.items():
        outer, _, inner = name.partition(".")
        value = getattr(req, outer)
        if inner:
            value = getattr(value, inner, None)
        if not refusal.accepts(value):
            raise refusal_error(name, refusal)
    return req


def _invalid(param: str, detail: str, code: str = "invalid_value") -> OpenAIError:
    return bad_request(f"Invalid value for '{param}': {detail}", param, code)


@dataclass
class ChatForm:
    """The chat request a Responses request becomes, and where each message came from (error params)."""

    body: dict[str, Any]
    origins: list[str] = field(default_factory=list)


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(param, "expected a string or an array of input_text parts", "invalid_type")
    parts = []
    for k, part in enumerate(content):
        if (
            not isinstance(part, dict)
            or part.get("type") not in TEXT_PARTS
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, dict) else None
            raise bad_request(
                f"Unsupported value for '{param}.{k}': only text parts (input_text, output_text) are "
                "supported" + (f", not {kind}" if kind else ""),
                f"{param}.{k}",
                "unsupported_value",
            )
        parts.append(part["text"])
    return "".join(parts)


def _messages(req: ResponsesRequest, form: ChatForm) -> None:
    messages: list[dict[str, Any]] = []

    def add(message: dict[str, Any], origin: str) -> None:
        messages.append(message)
        form.origins.append(origin)

    if req.instructions:
        add({"role": "system", "content": req.instructions}, "instructions")
    if isinstance(req.input, str):
        add({"role": "user", "content": req.input}, "input")
    else:
        for j, item in enumerate(req.input):
            param = f"input.{j}"
            kind = item.get("type", "message")
            if kind == "message":
                extra = set(item) - {"type", "role", "content", "id", "status"}
                if extra:
                    raise bad_request(
                        f"Unrecognized request argument supplied: {param}.{min(extra)}",
                        f"{param}.{min(extra)}",
                        "unknown_parameter",
                    )
                if item.get("role") not in ROLES:
                    raise _invalid(f"{param}.role", f"expected one of {', '.join(ROLES)}")
                add({"role": item["role"], "content": _text(item.get("content"), f"{param}.content")}, param)
            elif kind == "function_call":
                call = {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")},
                }
                last = messages[-1] if messages else None
                if (
                    last is not None
                    and last["role"] == "assistant"
                    and last.get("tool_calls")
                    and not last["content"]
                ):
                    last["tool_calls"].append(call)  # consecutive calls: one assistant turn
                else:
                    add({"role": "assistant", "content": None, "tool_calls": [call]}, param)
            elif kind == "function_call_output":
                output = item.get("output")
                add(
                    {
                        "role": "tool",
                        "tool_call_id": item.get("call_id"),
                        "content": _text(output, f"{param}.output"),
                    },
                    param,
                )
            else:
                raise bad_request(
                    f"Unsupported value for '{param}.type': {kind!r} items are not supported (message, "
                    "function_call and function_call_output are)",
                    f"{param}.type",
                    "unsupported_value",
                )
    form.body["messages"] = messages


def _tools(req: ResponsesRequest, form: ChatForm) -> None:
    if req.tools is not None:
        tools = []
        for k, tool in enumerate(req.tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise bad_request(
                    f"Unsupported value for 'tools.{k}.type': only function tools are supported"
                    + (f", not {kind}" if kind else ""),
                    f"tools.{k}.type",
                    "unsupported_value",
                )
            tools.append({"type": "function", "function": {k2: v for k2, v in tool.items() if k2 != "type"}})
        form.body["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None and not isinstance(choice, str):
        raise _invalid(
            "tool_choice", "expected 'none', 'auto', 'required' or {'type': 'function', 'name': ...}"
        )
    form.body["tool_choice"] = choice


def _format(req: ResponsesRequest, form: ChatForm) -> None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.get("type") in ("text", "json_object"):
        form.body["response_format"] = fmt
        return
    if fmt.get("type") != "json_schema":
        raise _invalid(
            "text.format.type", f"{fmt.get('type')!r} is not one of 'text', 'json_object', 'json_schema'"
        )
    form.body["response_format"] = {
        "type": "json_schema",
        "json_schema": {k: v for k, v in fmt.items() if k != "type"},
    }


_RENAMES = [
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"^response_format\.json_schema"), "text.format"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^tools\.(\d+)\.function"), r"tools.\1"),
    (re.compile(r"^tool_choice\.function"), "tool_choice"),
]


def responses_param(param: str | None, origins: list[str]) -> str | None:
    """The Responses field a chat request's error names (messages map back to input items)."""
    if param is None:
        return None
    if m := re.match(r"^messages\.(\d+)(.*)$", param):
        origin = origins[int(m.group(1))] if int(m.group(1)) < len(origins) else "input"
        rest = m.group(2)
        if origin == "instructions" or rest.startswith((".tool_calls", ".tool_call_id")):
            return origin  # a call's own fields live on its function_call / function_call_output item
        return origin + rest
    if param == "messages":
        return "input"
    for pattern, repl in _RENAMES:
        if pattern.match(param):
            return pattern.sub(repl, param)
    return param


def renamed(exc: OpenAIError, origins: list[str]) -> OpenAIError:
    """``exc`` naming the Responses field instead of the chat one, in its param and its message."""
    param = responses_param(exc.param, origins)
    message = exc.message.replace(f"'{exc.param}'", f"'{param}'") if exc.param and param else exc.message
    return OpenAIError(exc.status, message, exc.type, param, exc.code)


def to_chat(req: ResponsesRequest) -> tuple[ChatCompletionRequest, list[str]]:
    """The chat request this Responses request is, checked as chat checks it; errors name Responses fields."""
    form = ChatForm(
        {
            "model": req.model,
            "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": req.stream,
            "parallel_tool_calls": req.parallel_tool_calls,
            "user": req.user,
        }
    )
    _messages(req, form)
    _tools(req, form)
    _format(req, form)
    body = {k: v for k, v in form.body.items() if v is not None}
    try:
        chat: ChatCompletionRequest = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
        reject_unsupported(chat)
    except OpenAIError as exc:
        raise renamed(exc, form.origins) from None
    return chat, form.origins


# ---- the answer ------------------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


@dataclass
class ResponseWriter:
    """Builds one Response: its output items as they complete, and for streaming the events that say so."""

    req: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)
    _sequence: int = 0
    _message: dict[str, Any] | None = None  # the message item being streamed, if any
    _text: list[str] = field(default_factory=list)

    def response(
        self, status: Literal["in_progress", "completed", "incomplete"], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        req = self.req
        text_format = (req.text.format if req.text and req.text.format else None) or {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": list(self.output),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "parallel_tool_calls": req.parallel_tool_calls,
            "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto",
            "text": {"format": text_format},
            "metadata": req.metadata or {},
            "store": False,
            "truncation": "disabled",
            "usage": usage,
        }

    def _event(self, kind: str, **fields: Any) -> bytes:
        self._sequence += 1
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    def start(self) -> list[bytes]:
        snapshot = self.response("in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def text(self, delta: str) -> list[bytes]:
        """Events for a piece of the answer's text (the message item opens with its first piece)."""
        if not delta:
            return []
        events = []
        if self._message is None:
            self._message = {
                "id": "msg_" + uuid.uuid4().hex,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.output.append(self._message)
            index = len(self.output) - 1
            events.append(
                self._event("response.output_item.added", output_index=index, item=dict(self._message))
            )
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=self._message["id"],
                    output_index=index,
                    content_index=0,
                    part=_part(""),
                )
            )
        self._text.append(delta)
        index = self.output.index(self._message)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=index,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def _close_message(self) -> list[bytes]:
        if self._message is None:
            return []
        message, text = self._message, "".join(self._text)
        index = self.output.index(message)
        message["content"] = [_part(text)]
        message["status"] = "completed"
        self._message, self._text = None, []
        return [
            self._event(
                "response.output_text.done",
                item_id=message["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=message["id"],
                output_index=index,
                content_index=0,
                part=_part(text),
            ),
            self._event("response.output_item.done", output_index=index, item=message),
        ]

    def calls(self, calls: list[ToolCall]) -> list[bytes]:
        """Events for function calls the answer completed (a message in progress closes first)."""
        events = self._close_message() if calls else []
        for call in calls:
            item = {
                "id": "fc_" + uuid.uuid4().hex,
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.id,
                "name": call.name,
                "arguments": "",
            }
            self.output.append(item)
            index = len(self.output) - 1
            events.append(self._event("response.output_item.added", output_index=index, item=dict(item)))
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=call.arguments,
                )
            )
            item.update(arguments=call.arguments, status="completed")
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=call.name,
                    arguments=call.arguments,
                )
            )
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def finish(self, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> list[bytes]:
        events = self._close_message()
        status = "incomplete" if finish_reason == "length" else "completed"
        final = self.response(status, _usage(prompt_tokens, completion_tokens))
        return [*events, self._event(f"response.{status}", response=final)]

    def whole(self, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streamed Response (the items were added with text() and calls())."""
        self._close_message()  # its events are for streaming: only the item's final form is kept
        status = "incomplete" if finish_reason == "length" else "completed"
        return self.response(status, _usage(prompt_tokens, completion_tokens))


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
