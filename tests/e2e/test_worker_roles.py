"""The NIXL backend between real workers, the colocated role's local handoff, the `fail` policy."""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from kvrelay_worker.model import load_model
from kvrelay_worker.model.tiny import make_tiny_model
from worker_fixtures import decode_inputs, metric_value, prefill_inputs, run_workers

pytestmark = pytest.mark.e2e
PROMPT = list(range(30, 71))
N = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[int]:
    model = load_model(model_dir)
    ids, out = torch.tensor([PROMPT]), []
    for _ in range(N):
        token = int(model.full_forward_logits(ids)[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def _generate(prefill_addr: str, decode_addr: str) -> tuple[list[int], str | None]:
    p = grpcclient.InferenceServerClient(prefill_addr)
    res = p.infer("kvrelay_prefill", prefill_inputs(grpcclient, PROMPT, max_tokens=N))
    first, handle = int(res.as_numpy("token_id")[0]), res.as_numpy("kv_handle")[0]
    assert json.loads(handle)["num_tokens"] == len(PROMPT)
    d = grpcclient.InferenceServerClient(decode_addr)
    q: queue.Queue = queue.Queue()
    d.start_stream(callback=lambda result, error: q.put((result, error)))
    tokens = [first]
    try:
        d.async_stream_infer("kvrelay_decode", decode_inputs(grpcclient, PROMPT, first, handle, max_tokens=N))
        while True:
            result, error = q.get(timeout=60)
            if error is not None:
                return tokens, str(error)
            tokens.append(int(result.as_numpy("token_id")[0]))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return tokens, None
    finally:
        d.stop_stream()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_nixl_relay_between_workers(model_dir: Path, expected: list[int]) -> None:
    small = ("--num-blocks", "64")
    with run_workers([("prefill", model_dir, small), ("decode", model_dir, small)], kv_backend="nixl") as (
        prefill,
        decode,
    ):
        tokens, error = _generate(prefill.grpc_address, decode.grpc_address)
        assert error is None and tokens == expected
        moved = metric_value(_metrics(decode.metrics_port), "kvrelay_kv_transfer_bytes_total", role="decode")
        assert moved and moved > 0
        failures = metric_value(_metrics(decode.metrics_port), "kvrelay_kv_transfer_failures_total")
        assert failures is None


def test_colocated_local_handoff_and_fail_policy(model_dir: Path, expected: list[int]) -> None:
    """One colocated process serves both models; a handle from another worker under `fail` errors."""
    specs = [
        ("colocated", model_dir, ("--num-blocks", "64", "--kv-failure-policy", "fail")),
        ("prefill", model_dir, ("--num-blocks", "64", "--kv-lease-s", "0.2")),
    ]
    with run_workers(specs) as (colo, prefill):
        tokens, error = _generate(colo.grpc_address, colo.grpc_address)
        assert error is None and tokens == expected
        text = _metrics(colo.metrics_port)
        assert metric_value(text, "kvrelay_kv_transfer_bytes_total", role="colocated") == 0  # no transfer
        assert metric_value(text, "kvrelay_kv_held_blocks", role="colocated") == 0
        assert metric_value(text, "kvrelay_kv_cache_usage_ratio", role="colocated") == 0
        # a prefill worker whose lease (0.2 s) expires before anyone reads its blocks
        # the lease has expired when the colocated worker tries to read: `fail` policy -> in-band error
        p = grpcclient.InferenceServerClient(prefill.grpc_address)
        res = p.infer("kvrelay_prefill", prefill_inputs(grpcclient, PROMPT, max_tokens=N))
        handle = res.as_numpy("kv_handle")[0]
        # lease expiry alone must free the prefill worker's blocks (nobody read them)
        deadline = time.monotonic() + 10
        while metric_value(_metrics(prefill.metrics_port), "kvrelay_kv_cache_usage_ratio") != 0:
            assert time.monotonic() < deadline, "prefill blocks not released after lease expiry"
            time.sleep(0.1)
        d = grpcclient.InferenceServerClient(colo.grpc_address)
        q: queue.Queue = queue.Queue()
        d.start_stream(callback=lambda result, error: q.put((result, error)))
        try:
            d.async_stream_infer(
                "kvrelay_decode", decode_inputs(grpcclient, PROMPT, expected[0], handle, max_tokens=N)
            )
            result, error = q.get(timeout=60)
            assert error is not None and "KV transfer failed" in str(error)
            # and the stream still serves a good request afterwards
            d.async_stream_infer(
                "kvrelay_decode", decode_inputs(grpcclient, PROMPT, expected[0], b"", max_tokens=3)
            )
            result, error = q.get(timeout=60)
            assert error is None and int(result.as_numpy("token_id")[0]) == expected[1]
        finally:
            d.stop_stream()
