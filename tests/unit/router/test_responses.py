"""The Responses API's request checks, pure: every parameter of the installed openai SDK's
`responses.create` is implemented or refused naming it, and errors name Responses fields."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from kvrelay_worker.router.errors import OpenAIError
from kvrelay_worker.router.responses import IMPLEMENTED, REFUSED, parse_request, responses_param, to_chat
from openai.types.responses import response_create_params

BASE = {"model": "m", "input": "hi"}


def sdk_params() -> set[str]:
    hints = typing.get_type_hints(response_create_params.ResponseCreateParamsBase)
    return set(hints) | {"stream"}


def check(body: dict[str, Any]) -> OpenAIError | None:
    try:
        to_chat(parse_request(json.dumps(body).encode()))
    except OpenAIError as exc:
        return exc
    return None


def test_every_sdk_parameter_is_implemented_or_refused() -> None:
    params = sdk_params()
    assert len(params) >= 25, "the SDK's parameter list was not read"
    covered = IMPLEMENTED | {name.partition(".")[0] for name in REFUSED}
    assert params <= covered, f"not implemented nor refused: {sorted(params - covered)}"
    for name in sorted(params - IMPLEMENTED):
        error = check({**BASE, name: "something"})
        assert error is not None and error.status == 400 and error.param == name, (
            name,
            error and error.body(),
        )
        assert error.code in ("unsupported_parameter", "unsupported_value", "invalid_type"), error.body()


@pytest.mark.parametrize("name", sorted(n for n, r in REFUSED.items() if r.noop and "." not in n))
def test_default_forms_of_refused_parameters_are_accepted(name: str) -> None:
    for value in REFUSED[name].noop:
        assert check({**BASE, name: value}) is None, (name, value)


def test_input_items_become_chat_messages() -> None:
    body = {
        **BASE,
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": '{"x": 1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "warm"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        ],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
        "max_output_tokens": 9,
    }
    chat, origins = to_chat(parse_request(json.dumps({**body, "text": None}).encode()))
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert [c.id for c in chat.messages[2].tool_calls or []] == ["c1", "c2"]  # consecutive calls: one turn
    assert origins == ["instructions", "input.0", "input.1", "input.3", "input.4", "input.5"]
    assert chat.max_completion_tokens == 9 and chat.tools and chat.tools[0]["function"]["name"] == "f"
    assert chat.tool_choice == {"type": "function", "function": {"name": "f"}}
    # a forced call and a format are two constraints: refused later, by the chat rules (chat.py)
    chat, _ = to_chat(parse_request(json.dumps({**body, "tool_choice": "auto"}).encode()))
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "object"}},
    }


def test_chat_params_map_back_to_responses_fields() -> None:
    origins = ["instructions", "input.0", "input.2"]
    assert responses_param("messages.2.content", origins) == "input.2.content"
    assert responses_param("messages.2.tool_calls.0.function.arguments", origins) == "input.2"
    assert responses_param("messages.0.content", origins) == "instructions"
    assert responses_param("max_completion_tokens", origins) == "max_output_tokens"
    assert responses_param("response_format.json_schema.schema", origins) == "text.format.schema"
    assert responses_param("tools.1.function.parameters", origins) == "tools.1.parameters"
    assert responses_param("tool_choice.function.name", origins) == "tool_choice.name"
