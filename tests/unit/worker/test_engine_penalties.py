"""logit_bias, min_tokens and the penalties through the engine: batching, the prefill/decode handoff,
resuming a migrated request, and refusals."""

from __future__ import annotations

import random

import pytest
import torch
from kvrelay_worker.engine import RequestRefused, SamplingParams
from kvrelay_worker.engine.sampler import sample
from kvrelay_worker.model import LlamaForCausalLM

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 101, 202]
PENALTIES = dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.3)
# The tiny model rarely repeats itself, so penalties bite late; pushed up, token 300 repeats until the
# penalties on its count push it down: the tokens then depend on counts over every earlier output.
REPEAT = dict(
    logit_bias={300: 8.0, 301: 7.0}, presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.2
)
DRAWS = {"greedy": {}, "seeded": dict(temperature=0.9, top_p=0.95, seed=77)}


def reference_tokens(model: LlamaForCausalLM, prompt: list[int], p: SamplingParams) -> list[int]:
    """Full recompute at every step, then ``sample`` with the history: what the engine must produce."""
    eos = set(model.config.eos_token_id)
    device = next(model.parameters()).device
    out: list[int] = []
    for step in range(p.max_tokens):
        logits = model.full_forward_logits(torch.tensor([prompt + out], device=device))[0, -1:]
        token = sample(logits, [p], [step], [prompt], [out], eos)[0]
        out.append(token)
        if token in p.stop_token_ids or (not p.ignore_eos and token in eos):
            break
    return out


def _run(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step(now=0.0).outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    return tokens


def _prompts(model: LlamaForCausalLM, n: int) -> list[list[int]]:
    rng = random.Random(7)
    vocab = model.config.vocab_size
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(2, 40))] for _ in range(n)]


@pytest.mark.parametrize("draw", DRAWS)
def test_penalized_requests_alone_and_in_a_batch_match(make_engine, tiny_model, draw: str) -> None:
    """Same tokens alone, in a mixed batch (plain greedy, plain seeded, other penalties) and by full
    recompute; the penalties do change them."""
    prompts = _prompts(tiny_model, 7)
    eos = tiny_model.config.eos_token_id[0]
    params = [
        SamplingParams(max_tokens=14, **PENALTIES, **DRAWS[draw]),
        SamplingParams(max_tokens=10),
        SamplingParams(max_tokens=12, logit_bias={prompts[2][0]: 3.0, eos: 4.0}, min_tokens=5, **DRAWS[draw]),
        SamplingParams(max_tokens=9, temperature=1.1, seed=3),
        SamplingParams(max_tokens=14, frequency_penalty=-1.0, repetition_penalty=0.8, **DRAWS[draw]),
        SamplingParams(max_tokens=11, presence_penalty=2.0, ignore_eos=True, **DRAWS[draw]),
        SamplingParams(max_tokens=16, **REPEAT, **DRAWS[draw]),
    ]
    alone = [
        make_engine(num_blocks=64, block_size=4).generate([pr], p)[0]
        for pr, p in zip(prompts, params, strict=True)
    ]
    batch = make_engine(num_blocks=128, block_size=4, max_num_seqs=6).generate(prompts, params)
    assert batch == alone
    if draw == "greedy":  # paged vs dense logits differ in the last bits: only argmax compares exactly
        assert batch == [reference_tokens(tiny_model, pr, p) for pr, p in zip(prompts, params, strict=True)]
    unpenalized = make_engine(num_blocks=64, block_size=4).generate(
        [prompts[0]], SamplingParams(max_tokens=14, **DRAWS[draw])
    )
    assert unpenalized[0] != batch[0]


@pytest.mark.parametrize("draw", DRAWS)
def test_defaults_give_todays_tokens(make_engine, tiny_model, reference, draw: str) -> None:
    """Explicit defaults next to penalized requests: the tokens of the sampler before these fields."""
    prompts = _prompts(tiny_model, 3)
    defaults = SamplingParams(
        max_tokens=10,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        logit_bias={},
        min_tokens=0,
        **DRAWS[draw],
    )
    params = [defaults, SamplingParams(max_tokens=10, **PENALTIES), defaults]
    out = make_engine(num_blocks=128, block_size=4).generate(prompts, params)
    device = next(tiny_model.parameters()).device
    for i in (0, 2):
        if draw == "greedy":
            assert out[i] == reference(prompts[i], 10)
        else:  # the old call: no history, no EOS ids
            today: list[int] = []
            for step in range(10):
                ids = torch.tensor([prompts[i] + today], device=device)
                today.append(sample(tiny_model.full_forward_logits(ids)[0, -1:], [defaults], [step])[0])
            assert out[i] == today


def _eos_params(tiny_model: LlamaForCausalLM, draw: str) -> SamplingParams:
    """Penalties, EOS pushed to the top by logit_bias, min_tokens holding it off for 6 tokens."""
    eos = tiny_model.config.eos_token_id[0]
    return SamplingParams(max_tokens=12, min_tokens=6, logit_bias={eos: 30.0}, **PENALTIES, **DRAWS[draw])


def _resumed(p: SamplingParams, offset: int) -> SamplingParams:
    """What the router sends on a resume (router/resume.py): the rest of max_tokens, the output offset."""
    return p.model_copy(update={"max_tokens": p.max_tokens - offset, "output_offset": offset})


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("eos_bias", [False, True])
def test_resume_on_another_engine_gives_the_uninterrupted_tokens(
    make_engine, tiny_model, draw: str, eos_bias: bool
) -> None:
    """Prompt + the first k outputs with output_offset k, through a prefill (add_request) or a decode
    worker (add_decode_request, output k-1 as its first token): the rest of the uninterrupted run."""
    p = _eos_params(tiny_model, draw) if eos_bias else SamplingParams(max_tokens=16, **REPEAT, **DRAWS[draw])
    straight = make_engine(num_blocks=64, block_size=4).generate([PROMPT], p)[0]
    if eos_bias:
        assert len(straight) == 7 and straight[-1] in tiny_model.config.eos_token_id
    else:
        assert len(straight) == 16 and 1 < straight.count(300) < 16  # the penalties ended a run of 300s
    for k in range(1, len(straight)):
        engine = make_engine(num_blocks=64, block_size=4)
        engine.add_request("prefill", PROMPT + straight[:k], _resumed(p, k), now=0.0)
        engine.add_decode_request(
            "decode",
            PROMPT + straight[: k - 1],
            straight[k - 1],
            _resumed(p, k - 1),
            now=0.0,
            remote_kv=False,
        )
        got = _run(engine)
        assert got["prefill"] == straight[k:], k
        assert got["decode"] == straight[k:], k


@pytest.mark.parametrize("draw", DRAWS)
def test_prefill_decode_handoff_with_penalties(make_engine, tiny_model, draw: str) -> None:
    """The prefill worker samples the first token with the penalties; the decode worker, reading the
    prompt's KV, goes on with prompt + that token as history: the colocated run's tokens."""
    p = _eos_params(tiny_model, draw)
    straight = make_engine(num_blocks=64, block_size=4).generate([PROMPT], p)[0]
    prefill = make_engine(num_blocks=32, block_size=4)
    decode = make_engine(num_blocks=32, block_size=4)
    prefill.add_request("r", PROMPT, p, now=0.0, prefill_only=True)
    (first,) = prefill.step(now=0.0).outputs
    assert first.new_token_ids == straight[:1]
    decode.add_decode_request("r", PROMPT, first.new_token_ids[0], p, now=0.0, remote_kv=True)
    (target,) = decode.step(now=0.0).kv_targets
    decode.kv_cache[:, :, torch.tensor(target.block_ids)] = prefill.kv_cache[
        :, :, torch.tensor(first.kv_block_ids)
    ]
    prefill.release("r")
    decode.remote_kv_done("r", ok=True)
    assert first.new_token_ids + _run(decode)["r"] == straight


def test_min_tokens_holds_off_eos_and_stop_ids(make_engine, tiny_model) -> None:
    eos = tiny_model.config.eos_token_id
    engine = make_engine(num_blocks=64, block_size=4)
    pushed = SamplingParams(max_tokens=10, logit_bias={eos[0]: 100.0})
    assert engine.generate([PROMPT], pushed)[0] == [eos[0]]  # EOS is the argmax at once
    out = engine.generate([PROMPT], pushed.model_copy(update={"min_tokens": 5}))[0]
    assert len(out) == 6 and out[-1] == eos[0] and not set(out[:5]) & set(eos)
    stop = 300
    to_stop = SamplingParams(max_tokens=10, logit_bias={stop: 100.0}, stop_token_ids=[stop], min_tokens=3)
    out = engine.generate([PROMPT], to_stop)[0]
    assert len(out) == 4 and out[-1] == stop and stop not in out[:3]
    # ignore_eos: EOS is not a stop, so min_tokens leaves it alone (as vLLM does)
    free = SamplingParams(max_tokens=4, logit_bias={eos[0]: 100.0}, min_tokens=4, ignore_eos=True)
    assert engine.generate([PROMPT], free)[0] == [eos[0]] * 4


def test_min_tokens_holds_off_stop_strings(tiny_dir) -> None:
    from kvrelay_worker.engine import Engine, EngineConfig

    engine = Engine.from_dir(tiny_dir, EngineConfig(num_blocks=32, block_size=4))
    free = engine.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    needle = engine.scheduler.detokenize(free[:3])[-2:]  # ends a match within the first 3 tokens
    assert needle.strip()
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True, stop=[needle]))[0]
    assert len(stopped) <= 3
    held = SamplingParams(max_tokens=12, ignore_eos=True, stop=[needle], min_tokens=8)
    assert len(engine.generate([PROMPT], held)[0]) >= 9


def test_out_of_vocabulary_bias_and_offset_are_refused(make_engine, tiny_model) -> None:
    vocab = tiny_model.config.vocab_size
    engine = make_engine(num_blocks=32, block_size=4)
    bad = SamplingParams(logit_bias={5: 1.0, vocab: 1.0, vocab + 7: -1.0})
    message = rf"logit_bias token ids \[{vocab}, {vocab + 7}\] outside the vocabulary \[0, {vocab}\)"
    with pytest.raises(RequestRefused, match=message):
        engine.add_request("a", PROMPT, bad, now=0.0)
    with pytest.raises(RequestRefused, match=message):
        engine.add_decode_request("b", PROMPT, 5, bad, now=0.0, remote_kv=True)
    with pytest.raises(RequestRefused, match="output_offset 12 exceeds the prompt's 11 tokens"):
        engine.add_request("c", PROMPT, SamplingParams(output_offset=12), now=0.0)
    assert not engine.has_work() and not engine.scheduler.requests
    # the worker's wire parser names the field of a value out of range
    from kvrelay_worker.server.servicer import BadRequest, parse_sampling

    with pytest.raises(BadRequest, match=r"logit_bias\.5: Input should be less than or equal to 100"):
        parse_sampling([b'{"logit_bias": {"5": 250}}'])
