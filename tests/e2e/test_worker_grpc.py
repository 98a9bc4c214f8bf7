"""Real prefill + decode worker processes driven by the official tritonclient (sync and aio).

Greedy tokens relayed through the KV transport must equal a plain full-recompute forward of the
same checkpoint; malformed requests get in-band errors and the stream stays usable.
"""

from __future__ import annotations

import asyncio
import json
import queue
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from kvrelay_worker.model import load_model
from kvrelay_worker.model.tiny import make_tiny_model
from tritonclient.utils import InferenceServerException
from worker_fixtures import WorkerProcess, decode_inputs, metric_value, prefill_inputs, run_workers

pytestmark = pytest.mark.e2e

PROMPTS = [[5, 100, 200, 300, 7], [9, 8, 7], list(range(20, 57)), [400] * 19]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    model = load_model(model_dir)

    def greedy(prompt: list[int], n: int = MAX_TOKENS) -> list[int]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the tiny model gains nothing from threads; the workers need the cores
        try:
            ids, out = torch.tensor([prompt]), []
            for _ in range(n):
                token = int(model.full_forward_logits(ids)[0, -1].argmax())
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            return out
        finally:
            torch.set_num_threads(threads)

    return greedy


@pytest.fixture(scope="module")
def workers(model_dir: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    small = ("--num-blocks", "128", "--block-size", "8", "--kv-lease-s", "20", "--drain-seconds", "5")
    with run_workers([("prefill", model_dir, small), ("decode", model_dir, small)]) as (prefill, decode):
        yield prefill, decode
    assert prefill.proc.returncode == 0, prefill.log()
    assert decode.proc.returncode == 0, decode.log()


def _stream_sync(client: grpcclient.InferenceServerClient, requests: list[tuple[str, list]]) -> dict:
    """Send all requests on one stream; collect tokens (or the error) per request id."""
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        for rid, inputs in requests:
            client.async_stream_infer("kvrelay_decode", inputs, request_id=rid)
        results: dict[str, dict] = {rid: {"tokens": [], "finish": None, "error": None} for rid, _ in requests}
        pending = set(results)
        while pending:
            result, error = q.get(timeout=60)
            if error is not None:
                # tritonclient does not expose the id of a failed request; the test sends one bad one
                bad = [r for r in pending if r.startswith("bad")]
                results[bad[0]]["error"] = str(error)
                pending.discard(bad[0])
                continue
            resp = result.get_response()
            tok = result.as_numpy("token_id")
            if tok is not None:
                results[resp.id]["tokens"].append(int(tok[0]))
            if resp.parameters["triton_final_response"].bool_param:
                results[resp.id]["finish"] = resp.parameters["finish_reason"].string_param
                pending.discard(resp.id)
        return results
    finally:
        client.stop_stream()


def _prefill(client, prompt: list[int], **sampling) -> tuple[int, bytes, str]:
    res = client.infer("kvrelay_prefill", prefill_inputs(grpcclient, prompt, **sampling))
    return (
        int(res.as_numpy("token_id")[0]),
        res.as_numpy("kv_handle")[0],
        res.as_numpy("finish_reason")[0].decode(),
    )


def test_health_metadata_and_config(workers) -> None:
    prefill, decode = workers
    p = grpcclient.InferenceServerClient(prefill.grpc_address)
    d = grpcclient.InferenceServerClient(decode.grpc_address)
    assert p.is_server_live() and p.is_server_ready() and d.is_server_ready()
    assert p.is_model_ready("kvrelay_prefill") and not p.is_model_ready("kvrelay_decode")
    assert d.is_model_ready("kvrelay_decode")
    assert p.get_server_metadata().name == "kvrelay-worker-prefill"
    meta = d.get_model_metadata("kvrelay_decode")
    assert [i.name for i in meta.inputs] == ["input_ids", "first_token", "kv_handle", "sampling"]
    assert d.get_model_config("kvrelay_decode").config.model_transaction_policy.decoupled
    assert not p.get_model_config("kvrelay_prefill").config.model_transaction_policy.decoupled
    with pytest.raises(InferenceServerException, match="decoupled"):
        d.infer("kvrelay_decode", decode_inputs(grpcclient, [5, 6], 7, b"", max_tokens=3))
    with pytest.raises(InferenceServerException, match="not served"):
        p.get_model_metadata("kvrelay_decode")


def test_sync_client_relays_kv_and_matches_reference(workers, reference) -> None:
    prefill, decode = workers
    p = grpcclient.InferenceServerClient(prefill.grpc_address)
    d = grpcclient.InferenceServerClient(decode.grpc_address)
    requests, firsts = [], {}
    for i, prompt in enumerate(PROMPTS):
        first, handle, finish = _prefill(p, prompt, max_tokens=MAX_TOKENS)
        assert finish == "" and json.loads(handle)["num_tokens"] == len(prompt)
        firsts[f"r{i}"] = first
        requests.append((f"r{i}", decode_inputs(grpcclient, prompt, first, handle, max_tokens=MAX_TOKENS)))
    # a malformed request in the middle of the stream: in-band error, the others still finish
    requests.insert(2, ("bad0", decode_inputs(grpcclient, [5, 6], 7, b"", max_tokens="many")))
    results = _stream_sync(d, requests)
    assert "max_tokens" in results["bad0"]["error"]
    for i, prompt in enumerate(PROMPTS):
        r = results[f"r{i}"]
        assert [firsts[f"r{i}"], *r["tokens"]] == reference(prompt), f"prompt {i}"
        assert r["finish"] == "length"
    # the relayed KV was really moved, and every held block was released
    metrics = _metrics(decode)
    assert metric_value(metrics, "kvrelay_kv_transfer_bytes_total", role="decode") > 0
    assert metric_value(_metrics(prefill), "kvrelay_kv_held_blocks", role="prefill") == 0


def test_aio_client_many_requests_one_stream(workers, reference) -> None:
    prefill, decode = workers

    async def run() -> dict[str, list[int]]:
        p = grpcaio.InferenceServerClient(prefill.grpc_address)
        d = grpcaio.InferenceServerClient(decode.grpc_address)
        try:
            firsts = await asyncio.gather(
                *(
                    p.infer("kvrelay_prefill", prefill_inputs(grpcclient, pr, max_tokens=MAX_TOKENS))
                    for pr in PROMPTS
                )
            )
            tokens = {f"a{i}": [int(r.as_numpy("token_id")[0])] for i, r in enumerate(firsts)}
            done = asyncio.Event()

            async def requests():
                for i, (prompt, res) in enumerate(zip(PROMPTS, firsts, strict=True)):
                    inputs = decode_inputs(
                        grpcclient,
                        prompt,
                        tokens[f"a{i}"][0],
                        res.as_numpy("kv_handle")[0],
                        max_tokens=MAX_TOKENS,
                    )
                    yield {"model_name": "kvrelay_decode", "inputs": inputs, "request_id": f"a{i}"}
                # malformed: no kv_handle input; then a recompute request (empty handle) on the same stream
                bad = decode_inputs(grpcclient, [5, 6], 7, b"")[:2]
                yield {"model_name": "kvrelay_decode", "inputs": bad, "request_id": "bad"}
                yield {
                    "model_name": "kvrelay_decode",
                    "inputs": decode_inputs(
                        grpcclient, PROMPTS[0], tokens["a0"][0], b"", max_tokens=MAX_TOKENS
                    ),
                    "request_id": "recompute",
                }
                await done.wait()

            tokens["recompute"] = [tokens["a0"][0]]
            finals, errors = set(), []
            async for result, error in d.stream_infer(requests()):
                if error is not None:
                    errors.append(str(error))
                else:
                    resp = result.get_response()
                    tokens[resp.id].append(int(result.as_numpy("token_id")[0]))
                    if resp.parameters["triton_final_response"].bool_param:
                        finals.add(resp.id)
                if len(finals) == len(PROMPTS) + 1 and errors:
                    done.set()
                    break
            assert len(errors) == 1 and "kv_handle" in errors[0]
            return tokens
        finally:
            await p.close()
            await d.close()

    tokens = asyncio.run(asyncio.wait_for(run(), 120))
    for i, prompt in enumerate(PROMPTS):
        assert tokens[f"a{i}"] == reference(prompt)
    assert tokens["recompute"] == reference(PROMPTS[0])


def test_forged_handle_recomputes_and_counts_failure(workers, reference) -> None:
    prefill, decode = workers
    p = grpcclient.InferenceServerClient(prefill.grpc_address)
    d = grpcclient.InferenceServerClient(decode.grpc_address)
    prompt = PROMPTS[2]
    first, handle, _ = _prefill(p, prompt, max_tokens=MAX_TOKENS)
    forged = json.loads(handle)
    forged["num_tokens"] = len(prompt)
    forged["ranks"][0]["block_ids"] = forged["ranks"][0]["block_ids"][::-1]  # edited: signature breaks
    forged["holder"] = forged["ranks"][0]
    before = metric_value(_metrics(decode), "kvrelay_kv_transfer_failures_total", reason="bad_signature") or 0
    results = _stream_sync(
        d,
        [("f", decode_inputs(grpcclient, prompt, first, json.dumps(forged).encode(), max_tokens=MAX_TOKENS))],
    )
    assert [first, *results["f"]["tokens"]] == reference(prompt)  # recompute policy: still correct
    after = metric_value(_metrics(decode), "kvrelay_kv_transfer_failures_total", reason="bad_signature")
    assert after == before + 1


def test_prefill_finishing_at_first_token_and_bad_requests(workers, model_dir: Path) -> None:
    prefill, _ = workers
    p = grpcclient.InferenceServerClient(prefill.grpc_address)
    _, handle, finish = _prefill(p, PROMPTS[0], max_tokens=1)
    assert handle == b"" and finish == "length"
    with pytest.raises(InferenceServerException, match="vocabulary"):
        _prefill(p, [1, 10**9], max_tokens=3)
    with pytest.raises(InferenceServerException, match="missing input 'sampling'"):
        p.infer("kvrelay_prefill", prefill_inputs(grpcclient, [5, 6])[:1])
    assert p.is_server_ready()
    metrics = _metrics(prefill)
    for name in (
        "kvrelay_prompt_tokens_total",
        "kvrelay_generation_tokens_total",
        "kvrelay_requests_running",
        "kvrelay_requests_waiting",
        "kvrelay_queued_prefill_tokens",
        "kvrelay_kv_cache_usage_ratio",
        "kvrelay_request_queue_seconds_count",
        "kvrelay_prefill_seconds_count",
        "kvrelay_kv_held_bytes",
    ):
        assert metric_value(metrics, name, model=model_dir.name, role="prefill") is not None, name
    assert metric_value(metrics, "kvrelay_prefill_seconds_count", role="prefill") >= 1


def _metrics(worker: WorkerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_empty_final_response_when_asked(workers, reference) -> None:
    """tritonclient's enable_empty_final_response: tokens all non-final, then one empty final."""
    _, decode = workers
    d = grpcclient.InferenceServerClient(decode.grpc_address)
    q: queue.Queue = queue.Queue()
    d.start_stream(callback=lambda result, error: q.put((result, error)))
    ref = reference(PROMPTS[1], 5)
    try:
        inputs = decode_inputs(grpcclient, PROMPTS[1], ref[0], b"", max_tokens=5)
        d.async_stream_infer("kvrelay_decode", inputs, request_id="e", enable_empty_final_response=True)
        tokens, finals = [], []
        while True:
            result, error = q.get(timeout=60)
            assert error is None, error
            params = result.get_response().parameters
            finals.append(params["triton_final_response"].bool_param)
            token = result.as_numpy("token_id")
            if token is not None:
                tokens.append(int(token[0]))
            if finals[-1]:
                assert token is None and params["finish_reason"].string_param == "length"
                break
    finally:
        d.stop_stream()
    assert [ref[0], *tokens] == ref and finals == [False] * 4 + [True]


def test_seeded_sampling_is_reproducible_over_the_wire(workers) -> None:
    _, decode = workers
    d = grpcclient.InferenceServerClient(decode.grpc_address)
    sampling = {"max_tokens": 12, "temperature": 1.5, "top_p": 0.95, "top_k": 50}
    reqs = [
        (f"s{i}", decode_inputs(grpcclient, PROMPTS[0], 162, b"", seed=seed, **sampling))
        for i, seed in enumerate([7, 7, 8])
    ]
    results = _stream_sync(d, reqs)
    same, again, other = (results[f"s{i}"]["tokens"] for i in range(3))
    assert len(same) == 11 and same == again  # same seed, same tokens, even sharing the batch
    assert other != same
