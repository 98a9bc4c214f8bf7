"""Logprobs over KServe v2 between real workers (tcp KV), read with the official tritonclient.

The prefill response carries the first token's and the prompt's logprobs, every decode stream response
with a token its token's, as FP32/INT64 tensors of the contract's shapes (docs/wire-contracts.md 3),
equal to the in-process engine's; without the fields in ``sampling`` none of them appear.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams, TokenLogprobs
from kvrelay_worker.model.tiny import make_tiny_model
from worker_fixtures import WorkerProcess, decode_inputs, prefill_inputs, run_workers

pytestmark = pytest.mark.e2e

PROMPT = [(7 * i + 13) % 400 + 5 for i in range(37)]  # over --max-batch-tokens: a chunked prefill
N = 6
TOL = 1e-4
PLAIN_PREFILL = ["token_id", "kv_handle", "finish_reason"]
TOKEN_OUTPUTS = {"logprob": ("FP32", 1), "top_token_ids": ("INT64", 2), "top_logprobs": ("FP32", 2)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine_run(model_dir: Path):
    """``run(sampling)``: (tokens, logprobs of each, prompt logprobs) of the in-process engine."""
    engine = Engine.from_dir(model_dir, EngineConfig(num_blocks=64, block_size=8, max_batch_tokens=16))

    def run(**sampling: object) -> tuple[list[int], list[TokenLogprobs], list[TokenLogprobs] | None]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the tiny model gains nothing from threads; the workers need the cores
        try:
            engine.add_request("ref", PROMPT, SamplingParams.model_validate(sampling), now=0.0)
            tokens, scored, prompt = [], [], None
            while engine.has_work():
                for o in engine.step(now=0.0).outputs:
                    tokens += o.new_token_ids
                    scored += o.logprobs or []
                    prompt = prompt if o.prompt_logprobs is None else o.prompt_logprobs
            return tokens, scored, prompt
        finally:
            torch.set_num_threads(threads)

    return run


@pytest.fixture(scope="module")
def workers(model_dir: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess, WorkerProcess]]:
    small = ("--num-blocks", "64", "--block-size", "8", "--max-batch-tokens", "16", "--drain-seconds", "5")
    specs = [("prefill", model_dir, small), ("decode", model_dir, small), ("colocated", model_dir, small)]
    with run_workers(specs) as (prefill, decode, colocated):
        yield prefill, decode, colocated


def _stream(address: str, inputs: list) -> tuple[list[grpcclient.InferResult], str | None]:
    """One decode request on a stream: its responses up to the final one, or the in-band error."""
    client = grpcclient.InferenceServerClient(address)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    results: list[grpcclient.InferResult] = []
    try:
        client.async_stream_infer("kvrelay_decode", inputs, request_id="r")
        while True:
            result, error = q.get(timeout=60)
            if error is not None:
                return results, str(error)
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results, None
    finally:
        client.stop_stream()


def _names(result: grpcclient.InferResult) -> list[str]:
    return [o.name for o in result.get_response().outputs]


def _check_token(result: grpcclient.InferResult, expected: TokenLogprobs, k: int) -> None:
    """The response's token tensors: datatypes, shapes [1] / [1, k], values of the engine's."""
    outputs = {o.name: o for o in result.get_response().outputs}
    for name, (datatype, rank) in TOKEN_OUTPUTS.items():
        assert outputs[name].datatype == datatype and list(outputs[name].shape) == [1, k][:rank], name
    assert int(result.as_numpy("token_id")[0]) == expected.token_id
    value = result.as_numpy("logprob")
    assert value.dtype == np.float32 and abs(float(value[0]) - expected.logprob) < TOL
    ids, tops = result.as_numpy("top_token_ids"), result.as_numpy("top_logprobs")
    assert ids.dtype == np.int64 and tops.dtype == np.float32 and ids.shape == tops.shape == (1, k)
    assert ids[0].tolist() == list(expected.top_ids)
    assert np.allclose(tops[0], expected.top_logprobs, atol=TOL)


@pytest.mark.parametrize("role", ["split", "colocated"])
def test_prefill_and_decode_carry_logprobs(workers, engine_run, role: str) -> None:
    """Prompt logprobs and the first token's from prefill; each streamed token's from decode (relayed
    KV, then a recompute from an empty handle); the colocated role's local hand-off too."""
    prefill, decode, colocated = workers
    p_addr, d_addr = (
        (colocated.grpc_address,) * 2 if role == "colocated" else (prefill.grpc_address, decode.grpc_address)
    )
    sampling = dict(max_tokens=N, ignore_eos=True, logprobs=3)
    tokens, scored, prompt_scored = engine_run(**sampling, prompt_logprobs=2)
    assert prompt_scored is not None and len(scored) == N

    p = grpcclient.InferenceServerClient(p_addr)
    res = p.infer("kvrelay_prefill", prefill_inputs(grpcclient, PROMPT, **sampling, prompt_logprobs=2))
    n = len(PROMPT)
    assert _names(res) == [
        *PLAIN_PREFILL,
        *TOKEN_OUTPUTS,
        "prompt_logprobs",
        "prompt_top_token_ids",
        "prompt_top_logprobs",
    ]
    _check_token(res, scored[0], 3)
    values, ids, tops = (
        res.as_numpy(x) for x in ("prompt_logprobs", "prompt_top_token_ids", "prompt_top_logprobs")
    )
    assert values.dtype == np.float32 and values.shape == (n - 1,)
    assert (
        ids.dtype == np.int64
        and ids.shape == (n - 1, 2)
        and tops.dtype == np.float32
        and tops.shape == (n - 1, 2)
    )
    assert np.allclose(values, [e.logprob for e in prompt_scored], atol=TOL)
    assert ids.tolist() == [list(e.top_ids) for e in prompt_scored]
    assert np.allclose(tops, [e.top_logprobs for e in prompt_scored], atol=TOL)

    handle = res.as_numpy("kv_handle")[0]
    for kv_handle in (handle, b""):  # relayed (or handed over locally), then recomputed
        results, error = _stream(d_addr, decode_inputs(grpcclient, PROMPT, tokens[0], kv_handle, **sampling))
        assert error is None and len(results) == N - 1
        for result, expected in zip(results, scored[1:], strict=True):
            _check_token(result, expected, 3)


def test_zero_alternatives_and_seeded_draws(workers, engine_run) -> None:
    """logprobs 0: the sampled token's alone, top tensors of shape [1, 0]; a seeded draw scores the
    token it drew."""
    prefill, decode, _ = workers
    sampling = dict(
        max_tokens=N, ignore_eos=True, logprobs=0, temperature=0.8, seed=11, repetition_penalty=1.3
    )
    tokens, scored, _ = engine_run(**sampling)
    res = grpcclient.InferenceServerClient(prefill.grpc_address).infer(
        "kvrelay_prefill", prefill_inputs(grpcclient, PROMPT, **sampling, prompt_logprobs=0)
    )
    _check_token(res, scored[0], 0)
    assert res.as_numpy("prompt_top_token_ids").shape == (len(PROMPT) - 1, 0)
    handle = res.as_numpy("kv_handle")[0]
    results, error = _stream(
        decode.grpc_address, decode_inputs(grpcclient, PROMPT, tokens[0], handle, **sampling)
    )
    assert error is None
    for result, expected in zip(results, scored[1:], strict=True):
        _check_token(result, expected, 0)


def test_without_the_fields_nothing_changes(workers, engine_run) -> None:
    prefill, decode, _ = workers
    tokens, _, _ = engine_run(max_tokens=N, ignore_eos=True)
    res = grpcclient.InferenceServerClient(prefill.grpc_address).infer(
        "kvrelay_prefill", prefill_inputs(grpcclient, PROMPT, max_tokens=N, ignore_eos=True)
    )
    assert _names(res) == PLAIN_PREFILL and int(res.as_numpy("token_id")[0]) == tokens[0]
    handle = res.as_numpy("kv_handle")[0]
    results, error = _stream(
        decode.grpc_address,
        decode_inputs(grpcclient, PROMPT, tokens[0], handle, max_tokens=N, ignore_eos=True),
    )
    assert error is None and [int(r.as_numpy("token_id")[0]) for r in results] == tokens[1:]
    assert all(_names(r) == ["token_id"] for r in results)
    # a first token that already ends the request: no token in the answer, so no logprobs either
    results, error = _stream(
        decode.grpc_address, decode_inputs(grpcclient, PROMPT, tokens[0], b"", max_tokens=1, logprobs=2)
    )
    assert error is None and len(results) == 1 and _names(results[0]) == []


def test_decode_refuses_prompt_logprobs_in_band(workers) -> None:
    _, decode, _ = workers
    inputs = decode_inputs(grpcclient, PROMPT, 5, b"", max_tokens=N, prompt_logprobs=1)
    results, error = _stream(decode.grpc_address, inputs)
    assert not results and error is not None and "prompt_logprobs" in error and "prefill model only" in error
    # the worker goes on serving logprobs on the decode model
    results, error = _stream(
        decode.grpc_address, decode_inputs(grpcclient, PROMPT, 5, b"", max_tokens=2, logprobs=1)
    )
    assert error is None and len(results) == 1 and "logprob" in _names(results[0])
