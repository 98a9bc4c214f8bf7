"""logit_bias, min_tokens and the penalties against a plain-Python reference, greedy and seeded."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from kvrelay_worker.engine.sampler import sample, transform_logits
from kvrelay_worker.engine.sampling_params import SamplingParams
from pydantic import ValidationError

VOCAB = 50
EOS = (3, 4)
f32 = np.float32


def reference_row(
    row: list[float], p: SamplingParams, prompt: list[int], output: list[int], eos: tuple[int, ...]
) -> list[np.float32]:
    """One row's transformed logits, token by token in fp32, in the documented order."""
    x = [f32(v) for v in row]
    for token, bias in p.logit_bias.items():
        x[token] = x[token] + f32(bias)
    # generated so far: the last output_offset prompt tokens (outputs before a resume) + outputs
    generated = (prompt[len(prompt) - p.output_offset :] if p.output_offset else []) + output
    if len(generated) < p.min_tokens:
        for token in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            if 0 <= token < len(x):
                x[token] = f32("-inf")
    if p.repetition_penalty != 1.0:
        r = f32(p.repetition_penalty)
        for token in set(prompt) | set(output):
            x[token] = x[token] / r if x[token] > 0 else x[token] * r
    for token, count in Counter(generated).items():
        x[token] = x[token] - (f32(p.frequency_penalty) * f32(count) + f32(p.presence_penalty))
    return x


def _history(rng: random.Random) -> tuple[list[int], list[int]]:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]
    return prompt, output


CASES = {
    "bias": dict(logit_bias={0: 5.0, 7: -100.0, 49: 0.5}),
    "min_tokens": dict(min_tokens=40, stop_token_ids=[9, 11, 1000]),  # 1000: outside the vocabulary
    "min_tokens_ignore_eos": dict(min_tokens=40, stop_token_ids=[9], ignore_eos=True),
    "min_tokens_reached": dict(min_tokens=1, stop_token_ids=[9]),
    "repetition": dict(repetition_penalty=1.7),
    "repetition_below_one": dict(repetition_penalty=0.6),
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=-0.7),
    "all": dict(
        logit_bias={3: 10.0, 20: -3.0},
        min_tokens=40,
        stop_token_ids=[21],
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.9,
    ),
    "all_resumed": dict(
        logit_bias={3: 10.0},
        min_tokens=40,
        repetition_penalty=1.3,
        presence_penalty=-0.4,
        frequency_penalty=0.9,
        output_offset=5,
    ),
}


def _batch(case: dict, rows: int = 6, seed: int = 0):
    rng = random.Random(seed)
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    histories = [_history(rng) for _ in range(rows)]
    prompts = [h[0] for h in histories]
    outputs = [h[1] for h in histories]
    params = [SamplingParams(max_tokens=64, **case) for _ in range(rows)]
    return logits, params, prompts, outputs


@pytest.mark.parametrize("name", CASES)
def test_transform_matches_the_reference_exactly(name: str) -> None:
    logits, params, prompts, outputs = _batch(CASES[name])
    steps = [len(o) for o in outputs]
    got = transform_logits(logits, params, steps, prompts, outputs, EOS)
    want = [
        reference_row(logits[r].tolist(), params[r], prompts[r], outputs[r], EOS) for r in range(len(params))
    ]
    assert torch.equal(got, torch.tensor(np.array(want)))
    if name == "min_tokens_reached":  # every row has generated a token already: the ban is over
        assert all(outputs) and torch.equal(got, logits)
    else:
        assert not torch.equal(got, logits)
    assert torch.equal(logits, _batch(CASES[name])[0])  # the input is left alone


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["greedy", "seeded", "seeded_top_k_top_p"])
def test_sample_draws_from_the_transformed_logits(name: str, mode: str) -> None:
    """Greedy is the argmax of the transformed logits; a seeded draw is the plain sampler's on them."""
    draw = {
        "greedy": {},
        "seeded": dict(temperature=0.8, seed=11),
        "seeded_top_k_top_p": dict(temperature=1.3, top_k=20, top_p=0.8, seed=12),
    }[mode]
    case = {**CASES[name], **draw}
    logits, params, prompts, outputs = _batch(case, seed=1)
    steps = [len(o) for o in outputs]
    got = sample(logits, params, steps, prompts, outputs, EOS)
    want_logits = torch.tensor(
        np.array(
            [reference_row(logits[r].tolist(), params[r], prompts[r], outputs[r], EOS) for r in range(6)]
        )
    )
    plain = [SamplingParams(max_tokens=64, output_offset=p.output_offset, **draw) for p in params]
    assert got == sample(want_logits, plain, steps)
    if mode == "greedy":
        assert got == want_logits.argmax(-1).tolist()


def test_rows_without_transforms_keep_todays_tokens_in_a_mixed_batch() -> None:
    logits, params, prompts, outputs = _batch(CASES["all"], rows=6, seed=2)
    plain = [SamplingParams(), SamplingParams(temperature=0.9, seed=5, top_p=0.9)]
    mixed = [params[0], plain[0], params[1], plain[1], params[2], params[3]]
    steps = [len(o) for o in outputs]
    got = sample(logits, mixed, steps, prompts, outputs, EOS)
    # rows 1 and 3 alone, through the old signature (no history): the same tokens
    assert got[1] == sample(logits[1:2], [plain[0]], [steps[1]])[0]
    assert got[3] == sample(logits[3:4], [plain[1]], [steps[3]])[0]
    # rows that transform: what each gives alone
    for r in (0, 2, 4, 5):
        alone = sample(logits[r : r + 1], [mixed[r]], [steps[r]], [prompts[r]], [outputs[r]], EOS)
        assert got[r] == alone[0]


def test_explicit_defaults_are_no_transform() -> None:
    p = SamplingParams(
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={}, min_tokens=0
    )
    assert p == SamplingParams() and not p.transforms_logits
    logits = _batch({})[0]
    # no history needed, and the all-greedy shortcut still applies
    assert sample(logits, [p] * 6, [0] * 6) == logits.argmax(-1).tolist()


def test_greedy_takes_the_bias_into_account() -> None:
    logits = _batch({})[0]
    target = int(logits[0].argmin())
    p = SamplingParams(logit_bias={target: 100.0})
    assert sample(logits[:1], [p], [0], [[1]], [[]]) == [target]


def test_min_tokens_counts_output_offset_and_outputs() -> None:
    """The ban lifts once output_offset + outputs reaches min_tokens, whichever side they are on."""
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS[0]] = 10.0
    prompt = [1, 2, 3, 10, 11]
    for offset, outputs, banned in [
        (0, [], True),
        (2, [5, 6], True),
        (3, [5, 6], False),
        (0, [5] * 5, False),
    ]:
        p = SamplingParams(max_tokens=10, min_tokens=5, output_offset=offset)
        token = sample(logits, [p], [len(outputs)], [prompt], [outputs], EOS)[0]
        assert (token != EOS[0]) == banned, (offset, outputs)


def test_presence_and_frequency_count_the_resumed_outputs() -> None:
    """A resume (prompt + first k outputs, output_offset k) gets the uninterrupted run's logits."""
    logits, params, prompts, _ = _batch(CASES["all"], rows=1, seed=3)
    prompt, output = prompts[0], [7, 7, 8, 1, 7, 30]
    p = params[0]
    straight = transform_logits(logits, [p], [len(output)], [prompt], [output], EOS)
    for k in range(len(output) + 1):
        resumed = p.model_copy(update={"output_offset": k})
        moved = transform_logits(
            logits, [resumed], [len(output) - k], [prompt + output[:k]], [output[k:]], EOS
        )
        assert torch.equal(moved, straight), k


def test_history_is_required_only_for_rows_that_transform() -> None:
    logits = _batch({})[0][:2]
    with pytest.raises(ValueError, match="prompts and outputs"):
        sample(logits, [SamplingParams(), SamplingParams(presence_penalty=1.0)], [0, 0])


def test_out_of_vocabulary_bias_is_an_error_not_an_index() -> None:
    logits = _batch({})[0][:1]
    with pytest.raises(ValueError, match=r"logit_bias token id 50 outside the vocabulary \[0, 50\)"):
        sample(logits, [SamplingParams(logit_bias={50: 1.0})], [0], [[1]], [[]])


@pytest.mark.parametrize(
    "field",
    [
        {"presence_penalty": 2.01},
        {"presence_penalty": -2.01},
        {"frequency_penalty": 3},
        {"repetition_penalty": 0},
        {"repetition_penalty": -1},
        {"logit_bias": {"5": 100.5}},
        {"logit_bias": {"5": -101}},
        {"logit_bias": {"-1": 1}},
        {"logit_bias": {"x": 1}},
        {"min_tokens": -1},
        {"min_tokens": 17, "max_tokens": 16},
    ],
)
def test_out_of_range_values_are_refused(field: dict) -> None:
    with pytest.raises(ValidationError):
        SamplingParams.model_validate(field)


def test_wire_form_and_resume_limits() -> None:
    """JSON object keys are strings; min_tokens may exceed a resumed request's max_tokens (what is left)."""
    p = SamplingParams.model_validate_json('{"logit_bias": {"12": -100, "7": 2.5}, "min_tokens": 3}')
    assert p.logit_bias == {12: -100.0, 7: 2.5}
    assert SamplingParams(min_tokens=20, max_tokens=4, output_offset=16).min_tokens == 20


def test_model_copy_recomputes_transforms_logits() -> None:
    p = SamplingParams()
    assert not p.transforms_logits  # cached now
    assert p.model_copy(update={"presence_penalty": 1.0}).transforms_logits
