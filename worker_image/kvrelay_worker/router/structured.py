"""Structured output in the router: `response_format` and the `structured_outputs` extension, checked and
compiled into one llguidance grammar (``SamplingParams.grammar``) that the workers mask tokens with.

Why llguidance: one engine for JSON Schema, regular expressions and Lark grammars (so tool calls, which
mix fixed tags with JSON, need no second engine); it computes a mask in tens of microseconds on the CPU;
its wheel needs neither torch nor transformers (the router stays light); vLLM and SGLang use it as a
structured-output backend. Every check here runs in the router, so a bad schema is a 400 before any
worker sees the request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jsonschema
import llguidance

from kvrelay_worker.router.errors import OpenAIError, bad_request

# OpenAI's rule for response_format.json_schema.name and function names
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# the keys of the `structured_outputs` extension (vLLM's names), exactly one per request
STRUCTURED_OUTPUT_KEYS = ("json", "regex", "choice", "grammar")
MAX_CHOICES = 256  # `structured_outputs.choice` entries
# JSON on one line, separators as Python's json.dumps writes them: a small model given free whitespace
# can spend its whole budget on indentation. A schema's own "x-guidance" options override these.
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _invalid(param: str, detail: str) -> OpenAIError:
    return bad_request(f"Invalid value for '{param}': {detail}", param, "invalid_value")


def _type_error(param: str, expected: str, value: Any) -> OpenAIError:
    got = "null" if value is None else type(value).__name__
    return bad_request(f"Invalid type for '{param}': expected {expected}, got {got}.", param, "invalid_type")


def _object(value: Any, param: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    """A JSON object with only the ``allowed`` keys and every ``required`` one."""
    if not isinstance(value, dict):
        raise _type_error(param, "an object", value)
    for key in value:
        if key not in allowed:
            raise bad_request(
                f"Unrecognized request argument supplied: {param}.{key}",
                f"{param}.{key}",
                "unknown_parameter",
            )
    for key in sorted(required - set(value)):
        raise bad_request(
            f"Missing required parameter: '{param}.{key}'.", f"{param}.{key}", "missing_required_parameter"
        )
    return value


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON Schema (an object) that its own metaschema accepts; draft 2020-12 unless ``$schema`` says."""
    if not isinstance(schema, dict):
        raise _type_error(param, "an object (a JSON Schema)", schema)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(
            schema
        )
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise _invalid(
            param, f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
        ) from None
    return schema


def compile_grammar(grammar: str, param: str) -> str:
    """``grammar`` (llguidance's JSON form) if llguidance accepts it, else a 400 naming ``param``."""
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise _invalid(param, f"the grammar engine refused it: {error.strip()}")
    return grammar


def json_schema_grammar(schema: Mapping[str, Any], param: str) -> str:
    """The grammar of JSON documents valid against ``schema`` (checked, then compiled)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=JSON_LAYOUT)
    except ValueError as exc:
        raise _invalid(param, f"the grammar engine refused the schema: {exc}") from None
    return compile_grammar(grammar, param)


def response_format_grammar(response_format: Any) -> str | None:
    """Chat's ``response_format``: None for text, else the grammar of a JSON object or of the schema.

    ``strict`` false is accepted and enforced anyway: the output always follows the schema.
    """
    param = "response_format"
    if response_format is None:
        return None
    kind = _object(response_format, param, {"type", "json_schema"}, {"type"})["type"]
    if kind == "text":
        _object(response_format, param, {"type"})
        return None
    if kind == "json_object":
        _object(response_format, param, {"type"})
        return json_schema_grammar(ANY_JSON_OBJECT, param)
    if kind != "json_schema":
        raise _invalid(f"{param}.type", f"{kind!r} is not one of 'text', 'json_object', 'json_schema'")
    _object(response_format, param, {"type", "json_schema"}, {"json_schema"})
    spec = _object(
        response_format["json_schema"],
        f"{param}.json_schema",
        {"name", "description", "schema", "strict"},
        {"name"},
    )
    name = spec["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _invalid(f"{param}.json_schema.name", "must be 1 to 64 letters, digits, '_' or '-'")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise _type_error(f"{param}.json_schema.strict", "a boolean", spec["strict"])
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise _type_error(f"{param}.json_schema.description", "a string", spec["description"])
    schema_param = f"{param}.json_schema.schema"
    schema = ANY_JSON_OBJECT if spec.get("schema") is None else check_schema(spec["schema"], schema_param)
    return json_schema_grammar(schema, schema_param)


def structured_outputs_grammar(spec: Any) -> str | None:
    """The ``structured_outputs`` extension (vLLM's): exactly one of ``json`` (a JSON Schema), ``regex``,
    ``choice`` (a list of strings) or ``grammar`` (Lark, in llguidance's dialect)."""
    param = "structured_outputs"
    if spec is None:
        return None
    given = [
        k
        for k in STRUCTURED_OUTPUT_KEYS
        if _object(spec, param, set(STRUCTURED_OUTPUT_KEYS)).get(k) is not None
    ]
    if len(given) != 1:
        raise _invalid(param, f"give exactly one of {', '.join(STRUCTURED_OUTPUT_KEYS)} (got {len(given)})")
    key = given[0]
    value = spec[key]
    where = f"{param}.{key}"
    if key == "json":
        if isinstance(value, str):  # vLLM also takes the schema as a JSON string
            try:
                value = json.loads(value)
            except ValueError:
                raise _invalid(where, "a string must hold a JSON Schema as JSON") from None
        return json_schema_grammar(check_schema(value, where), where)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise _type_error(where, "a non-empty array of non-empty strings", value)
        if len(value) > MAX_CHOICES:
            raise _invalid(where, f"at most {MAX_CHOICES} choices, got {len(value)}")
        # Lark string literals take JSON's escapes: every choice stays a literal, whatever it holds
        lark = "start: " + " | ".join(json.dumps(c) for c in value)
        return compile_grammar(llguidance.LLMatcher.grammar_from_lark(lark), where)
    if not isinstance(value, str) or not value:
        raise _type_error(where, "a non-empty string", value)
    if key == "regex":
        return compile_grammar(llguidance.LLMatcher.grammar_from_regex(value), where)
    return compile_grammar(llguidance.LLMatcher.grammar_from_lark(value), where)
