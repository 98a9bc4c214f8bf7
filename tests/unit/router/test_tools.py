"""Tool calls and structured output in the router: the Hermes-format parser (streamed and whole), the
prompt rendering, the grammars and their checks."""

from __future__ import annotations

import json

import llguidance
import pytest
from kvrelay_worker.router.errors import OpenAIError
from kvrelay_worker.router.structured import response_format_grammar, structured_outputs_grammar
from kvrelay_worker.router.tools import (
    CALL_OPEN,
    ToolCallParser,
    call_grammar,
    parse_tools,
    render_messages,
    resolve_tool_choice,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = parse_tools([WEATHER, TIME])
ANSWER = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def _whole(text: str) -> tuple[str, list]:
    parser = ToolCallParser(TOOLS)
    head, _ = parser.feed(text)
    tail, _ = parser.finish()
    return head + tail, parser.calls


def test_calls_are_parsed_out_of_the_text() -> None:
    content, calls = _whole(ANSWER)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50])
def test_streamed_in_any_pieces_the_parse_is_the_same(size: int) -> None:
    parser = ToolCallParser(TOOLS)
    content, calls = [], []
    for i in range(0, len(ANSWER), size):
        text, new = parser.feed(ANSWER[i : i + size])
        assert CALL_OPEN not in text and "<tool" not in text  # a tag is never let out half-seen
        content.append(text)
        calls += new
    text, new = parser.finish()
    content.append(text)
    calls += new
    assert "".join(content) == "Let me check.\n"
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_what_is_not_a_call_stays_text() -> None:
    for text in (
        "a < b and <tool> tags",  # a partial tag that never completes
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>',
    ):
        assert _whole(text) == (text, [])
    # cut off before its closing tag (max_tokens): parsed if the JSON is whole, else left as text
    content, calls = _whole('<tool_call>\n{"name": "get_time", "arguments": {}}')
    assert content == "" and [c.name for c in calls] == ["get_time"]
    assert _whole('<tool_call>\n{"name": "get_ti') == ('<tool_call>\n{"name": "get_ti', [])


def test_tool_choice_resolution() -> None:
    assert resolve_tool_choice(None, TOOLS) == "auto"
    assert resolve_tool_choice(None, []) == "none"
    assert resolve_tool_choice("required", TOOLS) == "required"
    named = resolve_tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS)
    assert named is TOOLS[1]
    for bad, param in (
        ("required", "tool_choice"),
        ({"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        ({"type": "function"}, "tool_choice"),
    ):
        with pytest.raises(OpenAIError) as info:
            resolve_tool_choice(bad, [] if bad == "required" else TOOLS)
        assert info.value.param == param


def test_messages_render_calls_and_results_as_text() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {}}}
            ],
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
        {"role": "tool", "content": "sunny", "tool_call_id": "c2"},
    ]
    out = render_messages(messages, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert (
        out[3]["content"]
        == "<tool_response>\n12:00\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
    )
    # no tools shown (tool_choice none): no tools block, no system message added
    assert render_messages(messages[1:2], []) == [messages[1]]


def test_forced_call_grammar_admits_exactly_valid_calls() -> None:
    grammar = call_grammar(TOOLS, parallel=False)
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    named = call_grammar(TOOLS[:1], parallel=True)
    assert "get_weather" in named and "get_time" not in named


def test_structured_output_checks() -> None:
    assert response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_format_grammar({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert structured_outputs_grammar({"choice": ['say "yes"', "no\\n"]})
    assert structured_outputs_grammar({"json": json.dumps(schema)})
    for bad, param in (
        (
            {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 5}}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "s", "strict": "yes"}},
            "response_format.json_schema.strict",
        ),
        ({"type": "text", "json_schema": {}}, "response_format.json_schema"),
    ):
        with pytest.raises(OpenAIError) as info:
            response_format_grammar(bad)
        assert info.value.param == param, info.value.body()
    for bad, param in (
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"regex": ""}, "structured_outputs.regex"),
        ({"choice": ["a", 1]}, "structured_outputs.choice"),
        ({}, "structured_outputs"),
    ):
        with pytest.raises(OpenAIError) as info:
            structured_outputs_grammar(bad)
        assert info.value.param == param, info.value.body()
