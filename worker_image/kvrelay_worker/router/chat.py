"""A chat request's prompt and constraints: the messages rendered (tools included), the grammar the
workers mask tokens with, and the tools whose calls the answer is parsed for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2

from kvrelay_worker.router.errors import bad_request
from kvrelay_worker.router.protocol import ChatCompletionRequest
from kvrelay_worker.router.structured import response_format_grammar, structured_outputs_grammar
from kvrelay_worker.router.tools import Tool, call_grammar, parse_tools, render_messages, resolve_tool_choice
from kvrelay_worker.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    grammar: str | None  # llguidance grammar: response_format, structured_outputs or a forced tool call
    tools: list[Tool] | None  # parse the answer for calls to these (None: tool_choice none, or no tools)


def _template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as chat templates take them (Hugging Face's convention: call arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in req.messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _grammar(req: ChatCompletionRequest, choice: str | Tool, tools: list[Tool]) -> str | None:
    """At most one constraint: a forced tool call, `response_format`, or `structured_outputs`."""
    formatted = response_format_grammar(req.response_format)
    structured = structured_outputs_grammar(req.structured_outputs)
    constraints = {
        "tool_choice": choice == "required" or isinstance(choice, Tool),
        "response_format": formatted is not None,
        "structured_outputs": structured is not None,
    }
    given = [name for name, on in constraints.items() if on]
    if len(given) > 1:
        raise bad_request(
            f"Invalid value for '{given[1]}': it cannot be combined with {given[0]} (each constrains the "
            "whole answer)",
            given[1],
            "invalid_value",
        )
    if isinstance(choice, Tool):
        return call_grammar([choice], parallel=False)
    if choice == "required":
        return call_grammar(tools, parallel=req.parallel_tool_calls)
    return formatted or structured


def chat_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer) -> ChatPrompt:
    """Render and tokenize the chat; a template or tool error is a 400 naming the field."""
    tools = parse_tools(req.tools or [])
    choice = resolve_tool_choice(req.tool_choice, tools)
    grammar = _grammar(req, choice, tools)
    shown = tools if choice != "none" else []  # 'none': the model is not told of tools it may not call
    messages = _template_messages(req)
    try:
        if tokenizer.template_takes_tools:
            ids = tokenizer.encode_chat(messages, tools=[t.signature() for t in shown])
        else:
            ids = tokenizer.encode_chat(render_messages(messages, shown))
    except jinja2.TemplateError as exc:
        raise bad_request(f"chat template rejected the messages: {exc}", param="messages") from None
    return ChatPrompt(ids, grammar, shown or None)
