"""Logprobs from the engine: sampled tokens' and prompt positions' equal log_softmax of a full forward,
through batching, chunked prefill, preemption and recompute, prefill-only and decode requests."""

from __future__ import annotations

import random

import pytest
import torch
from engine_testing import count_preemptions
from kvrelay_worker.engine import RequestOutput, RequestRefused, SamplingParams, TokenLogprobs
from kvrelay_worker.engine.scheduler import SchedulerOutput
from kvrelay_worker.model import LlamaForCausalLM
from pydantic import ValidationError

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 101, 202]
LONG = [(7 * i + 13) % 400 + 5 for i in range(37)]
DRAWS = {"greedy": {}, "seeded": dict(temperature=0.9, top_p=0.95, seed=77)}
# pushed up, token 300 is sampled although the raw distribution does not favour it: logprobs stay raw
PENALTIES = dict(logit_bias={300: 8.0}, presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.2)


def _tol(model: LlamaForCausalLM) -> float:
    """1e-4 in fp32; a bf16 run (``KVRELAY_TEST_DTYPE``) differs between paged and dense attention."""
    return 1e-4 if next(model.parameters()).dtype == torch.float32 else 0.1


def reference_logprobs(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log_softmax of the model's single-pass forward: row q scores token q + 1."""
    device = next(model.parameters()).device
    logits = model.full_forward_logits(torch.tensor([ids], device=device))[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def assert_scored(entry: TokenLogprobs, row: torch.Tensor, token: int, k: int, tol: float) -> None:
    """``entry`` is ``token``'s logprob in ``row`` with the row's top ``k`` (ties in any order)."""
    assert entry.token_id == token
    assert abs(entry.logprob - float(row[token])) < tol
    assert len(entry.top_ids) == len(entry.top_logprobs) == k
    assert list(entry.top_logprobs) == sorted(entry.top_logprobs, reverse=True)
    if k:
        assert torch.allclose(torch.tensor(entry.top_logprobs), row.topk(k).values, atol=tol)
        assert torch.allclose(row[list(entry.top_ids)], torch.tensor(entry.top_logprobs), atol=tol)


def assert_prompt_scored(
    model: LlamaForCausalLM, prompt: list[int], entries: list[TokenLogprobs], k: int
) -> None:
    ref, tol = reference_logprobs(model, prompt), _tol(model)
    assert len(entries) == len(prompt) - 1
    for q, entry in enumerate(entries):
        assert_scored(entry, ref[q], prompt[q + 1], k, tol)


def _run(engine) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_work():
        for o in engine.step(now=0.0).outputs:
            outputs.setdefault(o.request_id, []).append(o)
    return outputs


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def _prompts(model: LlamaForCausalLM, n: int, longest: int = 40) -> list[list[int]]:
    rng = random.Random(3)
    vocab = model.config.vocab_size
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(1, longest))] for _ in range(n)]


@pytest.mark.parametrize("penalized", [False, True], ids=["plain", "penalized"])
@pytest.mark.parametrize("draw", DRAWS)
def test_sampled_logprobs_are_the_models_distribution(
    make_engine, tiny_model, draw: str, penalized: bool
) -> None:
    """Every generated token's logprob and top-k come from the raw logits, in a mixed batch; asking does
    not change the tokens, and requests that don't ask get none."""
    prompts = _prompts(tiny_model, 6)
    extra = {**DRAWS[draw], **(PENALTIES if penalized else {})}
    ks = [5, 0, None, 20, None, 1]
    engine = make_engine(num_blocks=128, block_size=4)
    for i, (prompt, k) in enumerate(zip(prompts, ks, strict=True)):
        engine.add_request(
            str(i), prompt, SamplingParams(max_tokens=9, ignore_eos=True, logprobs=k, **extra), 0.0
        )
    outputs = _run(engine)
    plain = make_engine(num_blocks=128, block_size=4)
    for i, prompt in enumerate(prompts):
        plain.add_request(str(i), prompt, SamplingParams(max_tokens=9, ignore_eos=True, **extra), 0.0)
    assert {rid: _tokens(o) for rid, o in _run(plain).items()} == {
        rid: _tokens(o) for rid, o in outputs.items()
    }
    tol, not_top = _tol(tiny_model), 0
    for i, (prompt, k) in enumerate(zip(prompts, ks, strict=True)):
        outs = outputs[str(i)]
        assert all(o.prompt_logprobs is None for o in outs)
        if k is None:
            assert all(o.logprobs is None for o in outs)
            continue
        tokens = _tokens(outs)
        entries = [e for o in outs for e in o.logprobs or []]
        assert all(len(o.logprobs or []) == len(o.new_token_ids) for o in outs)
        ref = reference_logprobs(tiny_model, prompt + tokens)
        for j, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
            assert_scored(entry, ref[len(prompt) - 1 + j], token, k, tol)
            not_top += entry.logprob < float(ref[len(prompt) - 1 + j].max()) - tol
    if penalized:  # the bias made tokens likely that the model itself does not rank first
        assert not_top > 0


@pytest.mark.parametrize("budget", [1, 5, 256], ids=["one-token-steps", "chunked", "one-step"])
def test_prompt_logprobs_over_chunks(make_engine, tiny_model, budget: int) -> None:
    """Prompt positions scored as the chunks run (one token a step included), reported once, on the
    first output; a plain request shares the steps."""
    engine = make_engine(num_blocks=64, block_size=4, max_batch_tokens=budget)
    engine.add_request("other", PROMPT, SamplingParams(max_tokens=6, ignore_eos=True), 0.0)
    params = SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=3, logprobs=2)
    engine.add_request("lp", LONG, params, 0.0)
    outputs = _run(engine)
    first, *rest = outputs["lp"]
    assert first.prompt_logprobs is not None and all(o.prompt_logprobs is None for o in rest)
    assert_prompt_scored(tiny_model, LONG, first.prompt_logprobs, 3)
    ref, tokens = reference_logprobs(tiny_model, LONG + _tokens(outputs["lp"])), _tokens(outputs["lp"])
    for j, entry in enumerate(e for o in outputs["lp"] for e in o.logprobs or []):
        assert_scored(entry, ref[len(LONG) - 1 + j], tokens[j], 2, _tol(tiny_model))
    assert all(o.prompt_logprobs is None and o.logprobs is None for o in outputs["other"])


def test_prompt_of_one_token_has_no_prompt_logprobs(make_engine) -> None:
    engine = make_engine(num_blocks=16, block_size=4)
    engine.add_request("one", [42], SamplingParams(max_tokens=2, prompt_logprobs=4), 0.0)
    assert _run(engine)["one"][0].prompt_logprobs == []


@pytest.mark.parametrize("when", ["mid-prompt", "after-first-token"])
def test_preempted_request_reports_each_prompt_position_once(make_engine, tiny_model, when: str) -> None:
    """A preempted request recomputes its prompt from position 0; positions scored before are neither
    scored again nor lost, and the sampled tokens' logprobs go on."""
    engine = make_engine(num_blocks=64, block_size=4, max_batch_tokens=8)
    params = SamplingParams(max_tokens=5, ignore_eos=True, prompt_logprobs=2, logprobs=3)
    engine.add_request("lp", LONG, params, 0.0)
    steps = 1 if when == "mid-prompt" else 6  # 37 tokens in chunks of 8: the first output at step 5
    outputs = [o for _ in range(steps) for o in engine.step(now=0.0).outputs]
    request = engine.scheduler.requests["lp"]
    assert len(request.prompt_logprobs) == (8 if when == "mid-prompt" else len(LONG) - 1)
    engine.scheduler._preempt(request, SchedulerOutput())
    assert request.num_computed_tokens == 0
    outputs += _run(engine)["lp"]
    firsts = [o for o in outputs if o.prompt_logprobs is not None]
    assert len(firsts) == 1 and firsts[0] is outputs[0]
    assert_prompt_scored(tiny_model, LONG, firsts[0].prompt_logprobs, 2)
    tokens = _tokens(outputs)
    ref = reference_logprobs(tiny_model, LONG + tokens)
    entries = [e for o in outputs for e in o.logprobs or []]
    assert len(entries) == len(tokens) == 5
    for j, entry in enumerate(entries):
        assert_scored(entry, ref[len(LONG) - 1 + j], tokens[j], 3, _tol(tiny_model))


def test_logprobs_under_block_pressure(make_engine, tiny_model) -> None:
    """Preemptions of chunked, partly computed requests: every request still gets each prompt position
    and each token scored exactly once."""
    prompts = _prompts(tiny_model, 14, longest=60)
    engine = make_engine(num_blocks=33, block_size=4, max_num_seqs=14, max_batch_tokens=48)
    preempted = count_preemptions(engine)
    for i, prompt in enumerate(prompts):
        p = SamplingParams(max_tokens=8, ignore_eos=True, prompt_logprobs=1, logprobs=1)
        engine.add_request(str(i), prompt, p, 0.0)
    outputs = _run(engine)
    assert preempted[0] > 0
    tol = _tol(tiny_model)
    for i, prompt in enumerate(prompts):
        outs = outputs[str(i)]
        assert_prompt_scored(tiny_model, prompt, outs[0].prompt_logprobs or [], 1)
        tokens = _tokens(outs)
        ref = reference_logprobs(tiny_model, prompt + tokens)
        entries = [e for o in outs for e in o.logprobs or []]
        assert len(entries) == len(tokens) == 8
        for j, entry in enumerate(entries):
            assert_scored(entry, ref[len(prompt) - 1 + j], tokens[j], 1, tol)


def test_prefill_only_request_carries_both(make_engine, tiny_model) -> None:
    engine = make_engine(num_blocks=32, block_size=4, max_batch_tokens=16)
    params = SamplingParams(max_tokens=8, prompt_logprobs=5, logprobs=4)
    engine.add_request("p", LONG, params, now=0.0, prefill_only=True)
    (out,) = [o for _ in range(3) for o in engine.step(now=0.0).outputs]
    assert out.kv_block_ids and not out.finished
    assert_prompt_scored(tiny_model, LONG, out.prompt_logprobs or [], 5)
    ref = reference_logprobs(tiny_model, LONG)
    assert_scored((out.logprobs or [])[0], ref[-1], out.new_token_ids[0], 4, _tol(tiny_model))
    assert engine.release("p")


@pytest.mark.parametrize("path", ["remote-kv", "failed-fetch", "recompute"])
def test_decode_request_scores_the_tokens_it_samples(make_engine, tiny_model, path: str) -> None:
    """The first token came from prefill: a decode request scores only what it samples, whichever way
    its prompt's KV arrived."""
    prefill = make_engine(num_blocks=32, block_size=4)
    prefill.add_request("r", PROMPT, SamplingParams(max_tokens=8), now=0.0, prefill_only=True)
    (first,) = prefill.step(now=0.0).outputs
    decode = make_engine(num_blocks=32, block_size=4)
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3)
    decode.add_decode_request(
        "r", PROMPT, first.new_token_ids[0], params, now=0.0, remote_kv=path != "recompute"
    )
    if path != "recompute":
        (target,) = decode.step(now=0.0).kv_targets
        if path == "remote-kv":
            decode.kv_cache[:, :, torch.tensor(target.block_ids)] = prefill.kv_cache[
                :, :, torch.tensor(first.kv_block_ids)
            ]
        decode.remote_kv_done("r", ok=path == "remote-kv")
    prefill.release("r")
    outs = _run(decode)["r"]
    tokens = [first.new_token_ids[0], *_tokens(outs)]
    assert len(tokens) == 8 and all(o.prompt_logprobs is None for o in outs)
    ref = reference_logprobs(tiny_model, PROMPT + tokens)
    entries = [e for o in outs for e in o.logprobs or []]
    assert len(entries) == 7
    for j, entry in enumerate(entries):
        assert_scored(entry, ref[len(PROMPT) + j], tokens[j + 1], 3, _tol(tiny_model))


def test_refusals(make_engine) -> None:
    for bad in ({"logprobs": 21}, {"logprobs": -1}, {"prompt_logprobs": 21}, {"prompt_logprobs": 1.5}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    engine = make_engine(num_blocks=16, block_size=4)
    with pytest.raises(RequestRefused, match="prefill model only"):
        engine.add_decode_request("d", PROMPT, 5, SamplingParams(prompt_logprobs=0), now=0.0, remote_kv=False)
    assert not engine.has_work()
