"""Tool calls: kvrelay's prompt format for models whose chat template has none, the grammar that forces a
call (`tool_choice` required or named), and the parser that turns generated text into `tool_calls`.

The format is the Hermes one (NousResearch's Hermes function-calling format, also what Qwen2.5's template
asks for): the tools' JSON signatures inside `<tools></tools>` in the system prompt, each call written as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, each tool result passed back inside
`<tool_response></tool_response>` in a user turn. It is plain text, so any template renders it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance

from kvrelay_worker.router.errors import OpenAIError, bad_request
from kvrelay_worker.router.structured import JSON_LAYOUT, NAME_PATTERN, check_schema, compile_grammar

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def signature(self) -> dict[str, Any]:
        """The tool as the prompt shows it (OpenAI's own `{"type": "function", "function": ...}` shape)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the API returns it

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _invalid(param: str, detail: str) -> OpenAIError:
    return bad_request(f"Invalid value for '{param}': {detail}", param, "invalid_value")


def parse_tools(raw: list[Any]) -> list[Tool]:
    """The request's `tools`: function tools with a valid name, unique, parameters a JSON Schema object."""
    tools: list[Tool] = []
    for i, entry in enumerate(raw):
        param = f"tools.{i}"
        if (
            not isinstance(entry, dict)
            or entry.get("type") != "function"
            or not isinstance(entry.get("function"), dict)
        ):
            raise _invalid(
                param, "only function tools are supported: {'type': 'function', 'function': {...}}"
            )
        extra = set(entry) - {"type", "function"}
        if extra:
            raise bad_request(
                f"Unrecognized request argument supplied: {param}.{min(extra)}",
                f"{param}.{min(extra)}",
                "unknown_parameter",
            )
        fn = entry["function"]
        extra = set(fn) - {"name", "description", "parameters", "strict"}
        if extra:
            key = f"{param}.function.{min(extra)}"
            raise bad_request(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise _invalid(f"{param}.function.name", "must be 1 to 64 letters, digits, '_' or '-'")
        if any(t.name == name for t in tools):
            raise _invalid(f"{param}.function.name", f"tool {name!r} is defined twice")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise _invalid(f"{param}.function.description", "must be a string")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise _invalid(f"{param}.function.strict", "must be a boolean")
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = NO_PARAMETERS
        else:
            check_schema(parameters, f"{param}.function.parameters")
            if parameters.get("type", "object") != "object":
                raise _invalid(f"{param}.function.parameters", "must describe an object (type 'object')")
        tools.append(Tool(name, description, parameters))
    return tools


def resolve_tool_choice(tool_choice: Any, tools: Sequence[Tool]) -> str | Tool:
    """'none' | 'auto' | 'required', or the one tool a named choice forces; OpenAI's defaults and errors."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise _invalid(
                "tool_choice", f"{tool_choice!r} is not one of 'none', 'auto', 'required' or a named function"
            )
        if tool_choice != "none" and not tools:
            raise _invalid("tool_choice", f"{tool_choice!r} needs tools")
        return tool_choice
    if (
        isinstance(tool_choice, dict)
        and tool_choice.get("type") == "function"
        and isinstance(tool_choice.get("function"), dict)
        and isinstance(tool_choice["function"].get("name"), str)
    ):
        name = tool_choice["function"]["name"]
        for tool in tools:
            if tool.name == name:
                return tool
        raise _invalid("tool_choice.function.name", f"no tool named {name!r} in tools")
    raise _invalid(
        "tool_choice",
        "expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
    )


def system_prompt(tools: Sequence[Tool]) -> str:
    """The Hermes-format tools block, appended to (or made into) the system message."""
    signatures = "\n".join(json.dumps(t.signature(), ensure_ascii=False) for t in tools)
    return (
        "You are a function calling AI model. You may call one or more of the functions below to help with "
        "the user's request. Do not make up argument values.\n"
        f"<tools>\n{signatures}\n</tools>\n"
        "To call a function, answer with a JSON object holding its name and arguments inside "
        f"{CALL_OPEN}{CALL_CLOSE} tags, one per call:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'
    )


def _call_text(name: str, arguments: Any) -> str:
    return (
        f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"
    )


def render_messages(messages: Sequence[dict[str, Any]], tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Messages with tool calls and tool results as plain-text content, for a template without tools.

    ``messages`` are in the template convention (``chat._template_messages``: call arguments as objects).
    An assistant turn's `tool_calls` become `<tool_call>` blocks after its content; consecutive `tool`
    messages become one user turn of `<tool_response>` blocks; the tools block goes into the system prompt.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                _call_text(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]
            ]
            content = "\n".join([content, *calls] if content else calls)
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        out.append({"role": role, "content": content})
    for message in out:
        message.pop("_tool_results", None)
    if tools:
        block = system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def call_grammar(tools: Sequence[Tool], parallel: bool) -> str:
    """A Lark grammar (llguidance) whose every sentence is one call, or several when ``parallel``, to the
    given tools, arguments valid against each tool's parameters: `tool_choice` required or named."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {**(variants[0] if len(variants) == 1 else {"anyOf": variants}), "x-guidance": JSON_LAYOUT}
    start = 'call ("\\n" call)*' if parallel else "call"
    lark = (
        f'start: {start}\ncall: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\nbody: %json {json.dumps(schema)}\n'
    )
    return compile_grammar(llguidance.LLMatcher.grammar_from_lark(lark), "tools")


def _parse_call(body: str, tools: Sequence[Tool]) -> ToolCall | None:
    """One `<tool_call>` body as a call to a known tool, or None (it is then left as text)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if obj["name"] not in {t.name for t in tools} or not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass
class ToolCallParser:
    """Splits generated text into content and tool calls as it streams in.

    Text that may be the start of `<tool_call>` is held back until it is known not to be; a call is
    emitted once its closing tag arrives (or at the end, unclosed). A block that does not parse as a call
    to a known tool goes out as content, as written.
    """

    tools: Sequence[Tool]
    calls: list[ToolCall] = field(default_factory=list)
    _pending: str = ""
    _in_call: bool = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content that is now certain, and the calls completed by ``text``."""
        self._pending += text
        content: list[str] = []
        new: list[ToolCall] = []
        while True:
            if self._in_call:
                end = self._pending.find(CALL_CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(CALL_CLOSE) :]
                self._in_call = False
                self._close(body, content, new, closed=True)
                continue
            start = self._pending.find(CALL_OPEN)
            if start >= 0:
                self._text(self._pending[:start], content)
                self._pending = self._pending[start + len(CALL_OPEN) :]
                self._in_call = True
                continue
            keep = _partial_suffix(self._pending, CALL_OPEN)
            self._text(self._pending[: len(self._pending) - keep], content)
            self._pending = self._pending[len(self._pending) - keep :]
            break
        return "".join(content), new

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Whatever is still held back: an unclosed call (parsed if it can be), or text."""
        content: list[str] = []
        new: list[ToolCall] = []
        if self._in_call:
            self._close(self._pending, content, new, closed=False)
        else:
            self._text(self._pending, content)
        self._pending, self._in_call = "", False
        return "".join(content), new

    def _close(self, body: str, content: list[str], new: list[ToolCall], closed: bool) -> None:
        call = _parse_call(body.strip(), self.tools)
        if call is None:
            content.append(CALL_OPEN + body + (CALL_CLOSE if closed else ""))
        else:
            new.append(call)
            self.calls.append(call)

    def _text(self, text: str, content: list[str]) -> None:
        # the newlines between and after calls are the format's, not the model's answer
        if text and (text.strip() or not self.calls):
            content.append(text)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
