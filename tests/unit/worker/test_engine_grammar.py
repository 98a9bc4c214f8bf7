"""Structured output in the engine: the grammar masks every sampled token, resumes replay into a new
matcher, and a bad grammar or a history that does not match is refused at admission."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import pytest
from kvrelay_worker.engine import Engine, EngineConfig, RequestRefused, SamplingParams
from tokenizers import Tokenizer

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 9]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_dir) -> Engine:
    return Engine.from_dir(tiny_dir, EngineConfig(num_blocks=64, block_size=4))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def _text(tokenizer: Tokenizer, engine: Engine, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in engine.scheduler.eos_token_ids])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_model_output_follows_a_json_schema(engine, tokenizer, temperature) -> None:
    """A random-weight model left alone writes gibberish; masked, every output parses and validates."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    params = SamplingParams(max_tokens=200, temperature=temperature, seed=3, grammar=grammar)
    free = engine.generate([PROMPT], params.model_copy(update={"grammar": None}))[0]
    with pytest.raises(ValueError):
        json.loads(_text(tokenizer, engine, free))
    for out in engine.generate([PROMPT] * 3, params):
        assert out[-1] in engine.scheduler.eos_token_ids, "the grammar finished, so the request ends on EOS"
        jsonschema.validate(json.loads(_text(tokenizer, engine, out)), SCHEMA)


def test_regex_and_lark_grammars(engine, tokenizer) -> None:
    regex = llguidance.LLMatcher.grammar_from_regex(r"(yes|no), [0-9]{3}")
    out = engine.generate([PROMPT], SamplingParams(max_tokens=20, grammar=regex))[0]
    assert re.fullmatch(r"(yes|no), [0-9]{3}", _text(tokenizer, engine, out))
    lark = llguidance.LLMatcher.grammar_from_lark('start: "<a>" /[a-z]{2,4}/ "</a>"')
    out = engine.generate([PROMPT], SamplingParams(max_tokens=20, temperature=1.0, seed=1, grammar=lark))[0]
    assert re.fullmatch(r"<a>[a-z]{2,4}</a>", _text(tokenizer, engine, out))


def test_a_resumed_request_goes_on_inside_the_grammar(engine, tokenizer) -> None:
    """Prefill -> decode hand-off and a resume at output k: the same tokens as one uninterrupted run."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=11, grammar=grammar)
    whole = engine.generate([PROMPT], params)[0]
    assert len(whole) > 6
    k = 4
    resumed = params.model_copy(update={"output_offset": k, "max_tokens": params.max_tokens - k})
    rest = engine.generate([PROMPT + whole[:k]], resumed)[0]
    assert whole[:k] + rest == whole
    # the decode half: first token from elsewhere, the rest here
    engine.add_decode_request("d", PROMPT, whole[0], params, now=0.0, remote_kv=False)
    got = [whole[0]]
    while engine.has_work():
        for o in engine.step(now=0.0).outputs:
            got.extend(o.new_token_ids)
    assert got == whole


def test_bad_grammar_and_unmatched_history_are_refused(engine) -> None:
    with pytest.raises(RequestRefused, match="does not compile"):
        engine.add_request(
            "a", PROMPT, SamplingParams(grammar=llguidance.LLMatcher.grammar_from_regex("a[")), 0.0
        )
    digits = llguidance.LLMatcher.grammar_from_regex("[0-9]+")
    with pytest.raises(RequestRefused, match="do not match the grammar"):
        # the "earlier output" (last prompt token) is not a digit
        engine.add_request("b", PROMPT, SamplingParams(grammar=digits, output_offset=1), 0.0)
    assert not engine.scheduler.requests
    with pytest.raises(ValueError, match="grammar and ignore_eos"):
        SamplingParams(grammar=digits, ignore_eos=True)


def test_min_tokens_yields_to_a_finished_grammar(engine, tokenizer) -> None:
    """min_tokens bans EOS, the only token a finished grammar allows: the grammar wins, no -inf row."""
    grammar = llguidance.LLMatcher.grammar_from_regex("ok")
    out = engine.generate([PROMPT], SamplingParams(max_tokens=10, min_tokens=5, grammar=grammar))[0]
    assert _text(tokenizer, engine, out) == "ok" and out[-1] in engine.scheduler.eos_token_ids
