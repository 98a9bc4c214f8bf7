"""Strict request validation: JSON types, messages, every openai SDK parameter implemented or refused."""

from __future__ import annotations

import collections.abc
import json
import types
import typing
from typing import Any, Literal, Required, Union

import pytest
from kvrelay_worker.router.errors import OpenAIError
from kvrelay_worker.router.protocol import (
    IMPLEMENTED,
    IMPLEMENTED_MESSAGE_FIELDS,
    IMPLEMENTED_ROLES,
    REFUSED,
    REFUSED_MESSAGE_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    check_sampling_ids,
    parse_body,
    reject_unsupported,
    resolve_max_tokens,
    sampling_params,
)
from openai.types import completion_create_params as completion_sdk
from openai.types.chat import completion_create_params as chat_sdk
from pydantic import BaseModel
from typing_extensions import is_typeddict

MODELS: dict[str, type[BaseModel]] = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
USER = {"role": "user", "content": "hi"}
BASE: dict[str, dict[str, Any]] = {
    "completions": {"model": "m", "prompt": "hi"},
    "chat": {"model": "m", "messages": [USER]},
}


def check(kind: str, body: dict[str, Any] | bytes) -> OpenAIError | None:
    """What the router's request checks make of a body: None (accepted) or the error it answers."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        reject_unsupported(parse_body(raw, MODELS[kind]))
    except OpenAIError as exc:
        return exc
    return None


def refused(kind: str, body: dict[str, Any] | bytes) -> OpenAIError:
    error = check(kind, body)
    assert error is not None, f"accepted: {body!r}"
    assert error.status == 400 and error.message, error.body()
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    return error


# --- strict JSON types ---------------------------------------------------------------------------

WRONG_TYPES = [
    ("chat", {"stream": "yes"}, "stream"),
    ("chat", {"stream": 1}, "stream"),
    ("completions", {"n": "2"}, "n"),
    ("completions", {"n": 2.0}, "n"),  # an integer parameter takes JSON integers only
    ("completions", {"max_tokens": True}, "max_tokens"),
    ("completions", {"max_tokens": "5"}, "max_tokens"),
    ("chat", {"max_completion_tokens": 5.5}, "max_completion_tokens"),
    ("completions", {"temperature": "0.5"}, "temperature"),
    ("completions", {"temperature": False}, "temperature"),
    ("completions", {"top_p": [1]}, "top_p"),
    ("completions", {"seed": 1.5}, "seed"),
    ("completions", {"top_k": "5"}, "top_k"),
    ("completions", {"ignore_eos": "true"}, "ignore_eos"),
    ("completions", {"user": 7}, "user"),
    ("completions", {"stop": 5}, "stop"),
    ("completions", {"stop": ["a", 1]}, "stop"),
    ("completions", {"stream": True, "stream_options": "yes"}, "stream_options"),
    (
        "completions",
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    ("completions", {"echo": 1}, "echo"),
    ("completions", {"logit_bias": {"5": 1.5}}, "logit_bias.5"),
    ("completions", {"presence_penalty": "0"}, "presence_penalty"),
    ("completions", {"model": 5}, "model"),
    ("completions", {"model": None}, "model"),
    ("completions", {"prompt": 3}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": [True]}, "prompt"),
    ("completions", {"prompt": [[1.0]]}, "prompt"),
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {"messages": ["hi"]}, "messages.0"),
    ("chat", {"messages": [USER, {"role": "user", "content": 5}]}, "messages.1.content"),
    ("chat", {"messages": [{"role": 1, "content": "x"}]}, "messages.0.role"),
    ("chat", {"logprobs": "false"}, "logprobs"),
]


@pytest.mark.parametrize(("kind", "fields", "param"), WRONG_TYPES, ids=[repr(f) for _, f, _ in WRONG_TYPES])
def test_wrong_types_are_refused_naming_the_field(kind: str, fields: dict[str, Any], param: str) -> None:
    error = refused(kind, {**BASE[kind], **fields})
    assert error.param == param, error.body()
    assert param in error.message


def test_type_errors_read_like_openai() -> None:
    error = refused("chat", {**BASE["chat"], "stream": "yes"})
    assert error.message == "Invalid type for 'stream': expected a boolean, but got a string instead."
    assert error.code == "invalid_type"
    error = refused("completions", {**BASE["completions"], "n": 2.0})
    assert error.message == "Invalid type for 'n': expected an integer, but got a number instead."


@pytest.mark.parametrize("fields", [{"temperature": 1}, {"top_p": 1}, {"presence_penalty": 0}, {"seed": -3}])
def test_integers_are_accepted_where_a_number_is_expected(fields: dict[str, Any]) -> None:
    assert check("completions", {**BASE["completions"], **fields}) is None


OUT_OF_RANGE = [
    ("completions", {"temperature": 2.5}, "temperature"),
    ("completions", {"temperature": -0.1}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"top_k": -2}, "top_k"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"prompt": []}, "prompt"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("chat", {"top_logprobs": 21}, "top_logprobs"),
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
]


@pytest.mark.parametrize(("kind", "fields", "param"), OUT_OF_RANGE, ids=[repr(f) for _, f, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused(kind: str, fields: dict[str, Any], param: str) -> None:
    error = refused(kind, {**BASE[kind], **fields})
    assert error.param == param and error.code == "invalid_value", error.body()


@pytest.mark.parametrize(
    "raw", [b"{not json", b'{"model": "m", "prompt": "x", "temperature": NaN}', b"\xff\xfe", b"[1]", b"null"]
)
def test_bodies_that_are_not_a_json_object(raw: bytes) -> None:
    error = refused("completions", raw)
    assert error.param is None


def test_missing_required_parameters() -> None:
    error = refused("completions", {"model": "m"})
    assert (error.param, error.code) == ("prompt", "missing_required_parameter")
    assert error.message == "Missing required parameter: 'prompt'."
    assert refused("chat", {"messages": [USER]}).param == "model"


# --- unknown fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fields", "param"),
    [
        ("completions", {"use_beam_search": True}, "use_beam_search"),  # vLLM extensions kvrelay lacks
        ("completions", {"length_penalty": 1.1}, "length_penalty"),
        ("chat", {"guided_json": {}}, "guided_json"),
        ("chat", {"foo": None}, "foo"),  # null does not make an unknown field known
        ("chat", {"messages": [{**USER, "foo": 1}]}, "messages.0.foo"),
        ("chat", {"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        ("completions", {"messages": [USER]}, "messages"),  # a chat field on /v1/completions
        ("chat", {"prompt": "x"}, "prompt"),
    ],
)
def test_unknown_fields_are_unrecognized(kind: str, fields: dict[str, Any], param: str) -> None:
    error = refused(kind, {**BASE[kind], **fields})
    assert error.message == f"Unrecognized request argument supplied: {param}"
    assert (error.param, error.code) == (param, "unknown_parameter")


# --- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(IMPLEMENTED_ROLES))
@pytest.mark.parametrize("content", ["missing", None])
def test_every_message_needs_content(role: str, content: str | None) -> None:
    message: dict[str, Any] = {"role": role} if content == "missing" else {"role": role, "content": content}
    messages = [USER, *_answered_call(message)]
    error = refused("chat", {**BASE["chat"], "messages": messages})
    at = len(messages) - 1
    assert (error.param, error.code) == (f"messages.{at}.content", "missing_required_parameter")
    assert error.message == f"Missing required parameter: 'messages.{at}.content'."


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
CALL_TURN = {"role": "assistant", "content": None, "tool_calls": [CALL]}


def _answered_call(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A tool message after the assistant call it answers (tool_call_id c1); other messages alone."""
    return [CALL_TURN, {**message, "tool_call_id": "c1"}] if message["role"] == "tool" else [message]


def test_assistant_tool_calls_must_be_answered_by_tool_messages() -> None:
    answer = {"role": "tool", "content": "4", "tool_call_id": "c1"}
    assert check("chat", {**BASE["chat"], "messages": [USER, CALL_TURN, answer]}) is None
    error = refused("chat", {**BASE["chat"], "messages": [USER, CALL_TURN]})
    assert error.param == "messages.1.tool_calls" and "no answer to c1" in error.message
    error = refused("chat", {**BASE["chat"], "messages": [USER, CALL_TURN, USER, answer]})
    assert error.param == "messages.1.tool_calls"  # the answer must come right after the call
    # null and [] are what SDKs send back for an assistant turn without calls.
    for empty in (None, []):
        message = {"role": "assistant", "content": "ok", "tool_calls": empty, "refusal": None}
        assert check("chat", {**BASE["chat"], "messages": [USER, message, USER]}) is None


def test_deprecated_function_messages_are_refused() -> None:
    message = {"role": "function", "content": "42", "name": "f"}
    error = refused("chat", {**BASE["chat"], "messages": [USER, message]})
    assert (error.param, error.code) == ("messages.1.role", "unsupported_value")
    assert "deprecated function role" in error.message


def test_a_tool_message_answers_an_earlier_call() -> None:
    error = refused(
        "chat", {**BASE["chat"], "messages": [USER, {"role": "tool", "content": "4", "tool_call_id": "c9"}]}
    )
    assert (error.param, error.code) == ("messages.1.tool_call_id", "invalid_value")
    error = refused(
        "chat", {**BASE["chat"], "messages": [USER, {"role": "user", "content": "4", "tool_call_id": "c1"}]}
    )
    assert error.param == "messages.1.tool_call_id"


def test_content_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_body(
        json.dumps({**BASE["chat"], "messages": [{"role": "user", "content": parts}]}).encode(),
        ChatCompletionRequest,
    )
    assert req.messages[0].text() == "ab"
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    for bad in ([], [image], [{"type": "text"}], [{"type": "text", "text": "a", "cache": 1}], ["a"]):
        error = refused("chat", {**BASE["chat"], "messages": [{"role": "user", "content": bad}]})
        assert error.param == "messages.0.content", (bad, error.body())


def test_max_tokens_and_max_completion_tokens() -> None:
    assert check("chat", {**BASE["chat"], "max_tokens": 5, "max_completion_tokens": 5}) is None
    error = refused("chat", {**BASE["chat"], "max_tokens": 5, "max_completion_tokens": 6})
    assert error.param == "max_tokens"
    req = ChatCompletionRequest.model_validate({**BASE["chat"], "max_completion_tokens": 7})
    assert req.requested_max_tokens() == (7, "max_completion_tokens")


def test_stream_options_need_stream() -> None:
    body = {**BASE["completions"], "stream_options": {"include_usage": True}}
    assert refused("completions", body).param == "stream_options"
    assert check("completions", {**body, "stream": True}) is None


def test_context_errors_name_the_right_param() -> None:
    with pytest.raises(OpenAIError) as info:
        resolve_max_tokens(None, 100, 100, 16)
    assert info.value.param == "prompt"
    with pytest.raises(OpenAIError) as info:
        resolve_max_tokens(None, 100, 100, None, "messages")
    assert info.value.param == "messages"
    with pytest.raises(OpenAIError) as info:
        resolve_max_tokens(95, 10, 100, None, "messages", "max_completion_tokens")
    assert info.value.param == "max_completion_tokens" and "max_completion_tokens" in info.value.message


# --- every SDK parameter: implemented or refused --------------------------------------------------
# The parameter lists come from the installed openai SDK, so a parameter a new SDK adds is tested too.

SDK_PARAMS = {
    "completions": (
        completion_sdk.CompletionCreateParamsBase,
        completion_sdk.CompletionCreateParamsStreaming,
    ),
    "chat": (chat_sdk.CompletionCreateParamsBase, chat_sdk.CompletionCreateParamsStreaming),
}
# Non-default values where the generic one would be a default (which is accepted as a no-op).
# Values the type alone does not make plausible: logit_bias keys are token ids.
OVERRIDES: dict[str, Any] = {
    "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
    "logit_bias": {"5": 2},
}
# Fields an implemented parameter needs beside it (as the API requires too).
COMPANIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("completions", "stream_options"): {"stream": True},
    ("chat", "stream_options"): {"stream": True},
    ("chat", "top_logprobs"): {"logprobs": True},
}


def sdk_hints(kind: str) -> dict[str, Any]:
    """Every request parameter of the SDK's create() for this endpoint (`stream` is on the subclasses)."""
    hints: dict[str, Any] = {}
    for cls in SDK_PARAMS[kind]:
        hints.update(typing.get_type_hints(cls))
    return hints


def plausible(tp: Any, depth: int = 0) -> Any:
    """A value of SDK type `tp` that is not its default: the last union arm, the last literal, true, 2."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if depth > 6 or tp in (Any, object):
        return "x"
    if origin in (Union, types.UnionType):
        return plausible([a for a in args if a is not type(None)][-1], depth + 1)
    if origin is Literal:
        return args[-1]
    if tp is bool:
        return True
    if tp is int:
        return 2
    if tp is float:
        return 0.5
    if tp is str:
        return "x"
    if is_typeddict(tp):
        return {k: plausible(v, depth + 1) for k, v in typing.get_type_hints(tp).items()}
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence):
        return [plausible(args[0], depth + 1)]
    if origin in (dict, collections.abc.Mapping):
        return {"k": plausible(args[1], depth + 1)}
    raise AssertionError(f"no plausible value for SDK type {tp!r}: teach plausible() about it")


def sdk_cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(endpoint, dotted param, body) for every SDK parameter; implemented object params field by field."""
    cases = []
    for kind in MODELS:
        for name, tp in sdk_hints(kind).items():
            if name in BASE[kind]:
                continue  # the required ones, present in every body; checked in the test below
            value = OVERRIDES.get(name, plausible(tp))
            body = {**BASE[kind], name: value, **COMPANIONS.get((kind, name), {})}
            fields = typing.get_type_hints(_unwrap_optional(tp)) if _is_typeddict_param(tp) else {}
            if name in IMPLEMENTED[kind] and fields:
                for field, field_tp in fields.items():
                    cases.append((kind, f"{name}.{field}", {**body, name: {field: plausible(field_tp)}}))
            else:
                cases.append((kind, name, body))
    return cases


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        return arms[0] if len(arms) == 1 else tp
    return tp


def _is_typeddict_param(tp: Any) -> bool:
    return is_typeddict(_unwrap_optional(tp))


SDK_CASES = sdk_cases()


@pytest.mark.parametrize(("kind", "param", "body"), SDK_CASES, ids=[f"{k}-{p}" for k, p, _ in SDK_CASES])
def test_every_sdk_parameter_is_implemented_or_refused(kind: str, param: str, body: dict[str, Any]) -> None:
    error = check(kind, body)
    if param in IMPLEMENTED[kind]:
        assert error is None, f"{param} is documented as implemented but refused: {error and error.body()}"
        return
    assert error is not None, f"{param}={body} was accepted, but the router does not implement it"
    assert error.status == 400 and error.param == param, error.body()
    assert error.code in ("unsupported_parameter", "unsupported_value"), error.body()
    assert param in error.message


def test_the_sdk_lists_are_really_read() -> None:
    """Guard against a silently empty parametrization (an SDK whose types moved)."""
    assert len([c for c in SDK_CASES if c[0] == "completions"]) >= 14
    assert len([c for c in SDK_CASES if c[0] == "chat"]) >= 30
    for kind, required in BASE.items():
        assert set(required) <= set(sdk_hints(kind)) and set(required) <= IMPLEMENTED[kind]


@pytest.mark.parametrize("kind", list(MODELS))
def test_null_for_any_optional_sdk_parameter_is_accepted(kind: str) -> None:
    """SDKs and clients send null for "not given"; the API treats it so."""
    for name in sdk_hints(kind):
        if name not in BASE[kind]:
            assert check(kind, {**BASE[kind], name: None}) is None, name


REFUSED_NOOPS = [
    (kind, name, value) for kind, table in REFUSED.items() for name, r in table.items() for value in r.noop
]


@pytest.mark.parametrize(
    ("kind", "param", "value"), REFUSED_NOOPS, ids=[f"{k}-{p}={v!r}" for k, p, v in REFUSED_NOOPS]
)
def test_default_forms_of_refused_parameters_keep_working(kind: str, param: str, value: Any) -> None:
    """SDKs send n=1, logprobs=false, presence_penalty=0...: these change nothing and are accepted."""
    if "." in param:
        outer, inner = param.split(".")
        body = {**BASE[kind], "stream": True, outer: {inner: value}}
    else:
        body = {**BASE[kind], param: value}
    assert check(kind, body) is None


@pytest.mark.parametrize(
    ("kind", "fields", "code"),
    [
        ("completions", {"best_of": 2}, "unsupported_value"),
        ("completions", {"suffix": "x"}, "unsupported_value"),
        ("chat", {"functions": [{"name": "f"}]}, "unsupported_value"),
        ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "unsupported_parameter"),
        ("chat", {"safety_identifier": "u1"}, "unsupported_parameter"),
    ],
)
def test_unsupported_values_and_parameters(kind: str, fields: dict[str, Any], code: str) -> None:
    (param,) = fields
    error = refused(kind, {**BASE[kind], **fields})
    assert (error.param, error.code) == (param, code), error.body()


# --- the chat messages of the SDK, per role and field ---------------------------------------------


def sdk_message_types() -> dict[str, Any]:
    """Role -> the SDK's TypedDict for that message, from the `messages` parameter's union."""
    (union,) = typing.get_args(sdk_hints("chat")["messages"])
    return {typing.get_args(typing.get_type_hints(t)["role"])[0]: t for t in typing.get_args(union)}


def message_cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(role, field, message) for every field of every message type in the SDK's `messages` union."""
    cases = []
    for role, message_type in sdk_message_types().items():
        for field, tp in typing.get_type_hints(message_type).items():
            if field in ("role", "content"):
                continue
            cases.append((role, field, {"role": role, "content": "x", field: plausible(tp)}))
        cases.append((role, "content", {"role": role, "content": "x"}))
    return cases


MESSAGE_CASES = message_cases()


@pytest.mark.parametrize(
    ("role", "field", "message"), MESSAGE_CASES, ids=[f"{r}-{f}" for r, f, _ in MESSAGE_CASES]
)
def test_every_sdk_message_field_is_implemented_or_refused(
    role: str, field: str, message: dict[str, Any]
) -> None:
    if field == "tool_calls":  # valid calls, answered (plausible() writes no JSON arguments)
        messages = [
            USER,
            {**message, "tool_calls": [CALL]},
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
        ]
    else:
        messages = [USER, *_answered_call(message)]
    error = check("chat", {**BASE["chat"], "messages": messages})
    at = messages.index(message) if message in messages else 1
    if role not in IMPLEMENTED_ROLES:
        assert error is not None and error.param == f"messages.{at}.role", error and error.body()
    elif field in IMPLEMENTED_MESSAGE_FIELDS:
        assert error is None, error.body()
    else:
        assert error is not None and error.param.startswith(f"messages.{at}.{field}"), error and error.body()
        assert field in REFUSED_MESSAGE_FIELDS


def required_keys(typed_dict: Any) -> set[str]:
    """Keys marked Required[...] (`__required_keys__` is empty under the SDK's `total=False`)."""
    hints = typing.get_type_hints(typed_dict, include_extras=True)
    return {k for k, v in hints.items() if typing.get_origin(v) is Required}


def test_only_text_content_parts_of_the_sdk_are_accepted() -> None:
    content = typing.get_type_hints(sdk_message_types()["user"])["content"]
    (parts,) = [a for a in typing.get_args(content) if a is not str]
    (part_union,) = typing.get_args(parts)
    for part_type in typing.get_args(part_union):
        hints = typing.get_type_hints(part_type)
        part = {k: plausible(hints[k]) for k in required_keys(part_type)}
        error = check("chat", {**BASE["chat"], "messages": [{"role": "user", "content": [part]}]})
        if part["type"] != "text":
            assert error is not None and error.param == "messages.0.content", part
            continue
        assert error is None
        for optional in set(hints) - set(part):  # e.g. prompt_cache_breakpoint: refused, not ignored
            extra = {**part, optional: plausible(hints[optional])}
            error = check("chat", {**BASE["chat"], "messages": [{"role": "user", "content": [extra]}]})
            assert error is not None and error.param == "messages.0.content", extra


def test_tables_name_fields_of_the_models() -> None:
    """A table entry that is no model field would be 'unrecognized', not implemented or refused."""
    for kind, model in MODELS.items():
        for name in {*IMPLEMENTED[kind], *REFUSED[kind]}:
            top, _, inner = name.partition(".")
            assert top in model.model_fields, (kind, name)
            if inner:
                annotation = model.model_fields[top].annotation
                nested = [
                    a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)
                ]
                assert nested and inner in nested[0].model_fields, (kind, name)


def test_top_k_minus_one_means_off_and_empty_stops_are_refused() -> None:
    """vLLM clients send top_k=-1 for "off"; an empty stop string would match at once, so it is refused."""
    req = parse_body(b'{"model": "m", "prompt": "x", "top_k": -1}', CompletionRequest)
    assert sampling_params(req, 4, [])["top_k"] == 0
    for stop in (b'""', b'["a", ""]'):
        with pytest.raises(OpenAIError) as err:
            parse_body(b'{"model": "m", "prompt": "x", "stop": ' + stop + b"}", CompletionRequest)
        assert err.value.param == "stop" and "empty" in str(err.value.body()), err.value.body()
    with pytest.raises(OpenAIError):
        parse_body(b'{"model": "m", "prompt": "x", "top_k": -2}', CompletionRequest)


def test_penalties_bias_and_min_tokens_reach_the_workers_only_when_set() -> None:
    """Implemented sampling fields go into the workers' SamplingParams; at their defaults they are left out
    (a worker that predates them still serves), and bad values are 400s naming the field."""
    plain = parse_body(b'{"model": "m", "prompt": "x"}', CompletionRequest)
    assert set(sampling_params(plain, 8, [2])) == {
        "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos",
    }  # fmt: skip
    body = {
        "model": "m", "prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -0.25,
        "repetition_penalty": 1.2, "logit_bias": {"7": -100, "9": 3}, "min_tokens": 3,
        "stop_token_ids": [4, 2],
    }  # fmt: skip
    params = sampling_params(parse_body(json.dumps(body).encode(), CompletionRequest), 8, [2])
    assert params["presence_penalty"] == 0.5 and params["frequency_penalty"] == -0.25
    assert params["repetition_penalty"] == 1.2 and params["min_tokens"] == 3
    assert params["logit_bias"] == {7: -100, 9: 3} and params["stop_token_ids"] == [2, 4]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"stop_token_ids": "2"}, "stop_token_ids"),
    ]
    for fields, param in bad:
        with pytest.raises(OpenAIError) as err:
            parse_body(json.dumps({"model": "m", "prompt": "x", **fields}).encode(), CompletionRequest)
        assert err.value.param == param, err.value.body()
    with pytest.raises(OpenAIError) as err:
        sampling_params(
            parse_body(b'{"model": "m", "prompt": "x", "min_tokens": 9}', CompletionRequest), 8, []
        )
    assert err.value.param == "min_tokens"
    for fields, param in (
        ({"logit_bias": {"600": 1}}, "logit_bias"),
        ({"stop_token_ids": [512]}, "stop_token_ids"),
    ):
        req = parse_body(json.dumps({"model": "m", "prompt": "x", **fields}).encode(), CompletionRequest)
        with pytest.raises(OpenAIError) as err:
            check_sampling_ids(req, vocab_size=512)
        assert err.value.param == param and "outside the vocabulary" in err.value.message


def test_logprobs_validation() -> None:
    """Chat: logprobs (bool) and top_logprobs (0..20, only with logprobs); completions: logprobs 0..5 and
    echo; max_tokens 0 only with echo (the prompt's logprobs alone, as evaluation harnesses ask)."""
    for body in (
        {"logprobs": True},
        {"logprobs": True, "top_logprobs": 0},
        {"logprobs": True, "top_logprobs": 20},
        {"logprobs": False},
    ):
        assert check("chat", {**BASE["chat"], **body}) is None, body
    for body, param, code in (
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),  # OpenAI: logprobs must be true
        ({"logprobs": False, "top_logprobs": 0}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "invalid_value"),
        ({"logprobs": 1}, "logprobs", "invalid_type"),
        ({"max_tokens": 0, "logprobs": True}, "max_tokens", "invalid_value"),
    ):
        error = refused("chat", {**BASE["chat"], **body})
        assert (error.param, error.code) == (param, code), (body, error.body())
    for body in (
        {"logprobs": 0},
        {"logprobs": 5},
        {"echo": True},
        {"echo": True, "logprobs": 1, "max_tokens": 0},
        {"echo": True, "max_tokens": 0},
    ):
        assert check("completions", {**BASE["completions"], **body}) is None, body
    for body, param, code in (
        ({"logprobs": 6}, "logprobs", "invalid_value"),  # OpenAI's bound
        ({"logprobs": True}, "logprobs", "invalid_type"),
        ({"echo": "true"}, "echo", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 0, "logprobs": 2}, "max_tokens", "invalid_value"),
    ):
        error = refused("completions", {**BASE["completions"], **body})
        assert (error.param, error.code) == (param, code), (body, error.body())


def test_logprobs_reach_the_workers_only_when_asked() -> None:
    def params(kind: str, max_tokens: int = 8, **fields: Any) -> dict[str, Any]:
        req = parse_body(json.dumps({**BASE[kind], **fields}).encode(), MODELS[kind])
        return sampling_params(req, max_tokens, [2])

    assert "logprobs" not in params("chat") and "logprobs" not in params("chat", logprobs=False)
    assert params("chat", logprobs=True)["logprobs"] == 0
    assert params("chat", logprobs=True, top_logprobs=7)["logprobs"] == 7
    assert "prompt_logprobs" not in params("chat", logprobs=True)
    assert params("completions", logprobs=0)["logprobs"] == 0
    assert "prompt_logprobs" not in params("completions", logprobs=3)
    assert "prompt_logprobs" not in params("completions", echo=True)  # echo alone needs no logprobs
    echo = params("completions", echo=True, logprobs=3)
    assert (echo["logprobs"], echo["prompt_logprobs"], echo["max_tokens"]) == (3, 3, 8)
    # max_tokens 0: the prefill runs with 1 (its token is dropped); min_tokens still must fit the 0
    assert params("completions", 0, echo=True, logprobs=1)["max_tokens"] == 1
    with pytest.raises(OpenAIError) as err:
        params("completions", 0, echo=True, min_tokens=1)
    assert err.value.param == "min_tokens"


def test_empty_message_content_is_accepted() -> None:
    """An empty string is content (the API accepts it); only a missing or null content is refused."""
    body = {"model": "m", "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]}
    req = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    reject_unsupported(req)
    assert req.messages[0].content == ""
