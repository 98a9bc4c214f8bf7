"""KV relay between real prefill and decode workers (issue 4): parity over every backend, failures.

Each test starts real `kvrelay-worker` processes (tests/e2e/worker_fixtures.py), talks to them
with the official tritonclient, and compares with single-process greedy decoding of the model.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from kvrelay_worker.model import load_model
from kvrelay_worker.model.tiny import make_tiny_model
from worker_fixtures import decode_inputs, metric_value, prefill_inputs, run_worker

pytestmark = pytest.mark.e2e
MAX_TOKENS = 6
NUM_PROMPTS = 20
UCX_ENVS = {
    "nixl-tcp": ("nixl", {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}),
    "nixl-cma": ("nixl", {"UCX_NET_DEVICES": "lo"}),  # default TLS: one-sided get over cma
    "tcp": ("tcp", {}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-kv"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(4)
    # Lengths straddle block boundaries (block size 16): partial, exact and multi-block prompts.
    lengths = [1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 70, 5, 9, 24, 40, 55, 80, 12, 18, 100]
    assert len(lengths) == NUM_PROMPTS
    return [[rng.randrange(10, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def expected(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Single-process greedy tokens: full forward over the growing sequence, no KV cache at all."""
    model = load_model(model_dir)
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids, tokens = torch.tensor([prompt]), []
            for _ in range(MAX_TOKENS):
                token = int(model.full_forward_logits(ids)[0, -1].argmax())
                tokens.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            out.append(tokens)
    return out


def prefill(addr: str, prompt: list[int]) -> tuple[int, bytes]:
    client = grpcclient.InferenceServerClient(addr)
    res = client.infer(
        "kvrelay_prefill", prefill_inputs(grpcclient, prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    return int(res.as_numpy("token_id")[0]), res.as_numpy("kv_handle")[0]


def decode_many(addr: str, jobs: list[tuple[list[int], int, bytes]], timeout_s: float = 60) -> list[tuple]:
    """Stream every job on one decode stream; returns (tokens after the first, error or None) per job."""
    client = grpcclient.InferenceServerClient(addr)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(jobs))}
    errors: dict[str, str | None] = {}
    try:
        for i, (prompt, first, handle) in enumerate(jobs):
            inputs = decode_inputs(grpcclient, prompt, first, handle, max_tokens=MAX_TOKENS, ignore_eos=True)
            client.async_stream_infer("kvrelay_decode", inputs, request_id=str(i))
        deadline = time.monotonic() + timeout_s
        while len(errors) < len(jobs):
            result, error = replies.get(timeout=max(deadline - time.monotonic(), 0.1))
            if error is not None:
                # In-band errors carry no request id on this client: attribute to the first open job.
                rid = next(k for k in tokens if k not in errors)
                errors[rid] = str(error)
                continue
            response = result.get_response()
            rid = response.id
            if "token_id" in {o.name for o in response.outputs}:
                tokens[rid].append(int(result.as_numpy("token_id")[0]))
            if response.parameters["triton_final_response"].bool_param:
                errors[rid] = None
    finally:
        client.stop_stream()
    return [(tokens[str(i)], errors[str(i)]) for i in range(len(jobs))]


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def wait_metric(port: int, name: str, want: float, timeout_s: float = 10, **labels: str) -> float | None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = metric_value(metrics(port), name, **labels)
        if value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def set_ucx_env(monkeypatch: pytest.MonkeyPatch, flavour: str) -> str:
    backend, env = UCX_ENVS[flavour]
    for key in ("UCX_TLS", "UCX_NET_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return backend


@pytest.mark.parametrize("flavour", list(UCX_ENVS))
def test_disaggregated_equals_single_process_for_20_prompts(
    model_dir: Path,
    prompts: list[list[int]],
    expected: list[list[int]],
    flavour: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = set_ucx_env(monkeypatch, flavour)
    blocks = ("--num-blocks", "128")
    with (
        run_worker("prefill", model_dir, *blocks, kv_backend=backend) as pre,
        run_worker("decode", model_dir, *blocks, kv_backend=backend) as dec,
    ):
        jobs = []
        for prompt in prompts:
            first, handle = prefill(pre.grpc_address, prompt)
            assert handle, "prefill must hand out a KV handle"
            assert json.loads(handle)["backend"] == backend
            jobs.append((prompt, first, handle))
        results = decode_many(dec.grpc_address, jobs)
        for i, ((rest, error), (_, first, _), want) in enumerate(zip(results, jobs, expected, strict=True)):
            assert error is None, f"prompt {i}: {error}"
            assert [first, *rest] == want, f"prompt {i} (len {len(prompts[i])}) differs"
        dec_metrics = metrics(dec.metrics_port)
        moved = metric_value(dec_metrics, "kvrelay_kv_transfer_bytes_total", role="decode")
        assert moved is not None and moved > 0
        assert metric_value(dec_metrics, "kvrelay_kv_transfer_seconds_count", role="decode") == NUM_PROMPTS
        assert metric_value(dec_metrics, "kvrelay_kv_transfer_failures_total") is None
        # Decode used the relayed KV: it computed no prompt token, the prefill computed every one.
        assert metric_value(dec_metrics, "kvrelay_prompt_tokens_computed_total", role="decode") == 0
        pre_metrics = metrics(pre.metrics_port)
        computed = metric_value(pre_metrics, "kvrelay_prompt_tokens_computed_total", role="prefill")
        assert computed == sum(map(len, prompts))
        assert metric_value(pre_metrics, "kvrelay_prompt_tokens_total", role="prefill") == computed
        # Every lease was released on the decode's done-notice (lease is 30 s: not by expiry).
        assert wait_metric(pre.metrics_port, "kvrelay_kv_held_blocks", 0, role="prefill") == 0
        assert wait_metric(pre.metrics_port, "kvrelay_kv_cache_usage_ratio", 0, role="prefill") == 0
        assert wait_metric(dec.metrics_port, "kvrelay_kv_cache_usage_ratio", 0, role="decode") == 0


@pytest.mark.parametrize(("flavour", "policy"), [("nixl-tcp", "recompute"), ("tcp", "fail")])
def test_prefill_killed_before_the_read(
    model_dir: Path,
    prompts: list[list[int]],
    expected: list[list[int]],
    flavour: str,
    policy: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = set_ucx_env(monkeypatch, flavour)
    blocks = ("--num-blocks", "64")
    picks = [3, 9, 19]  # 16, 64 and 100 tokens
    with run_worker("decode", model_dir, *blocks, "--kv-failure-policy", policy, kv_backend=backend) as dec:
        with run_worker("prefill", model_dir, *blocks, kv_backend=backend) as pre:
            jobs = [(prompts[i], *prefill(pre.grpc_address, prompts[i])) for i in picks]
            pre.proc.send_signal(signal.SIGKILL)
            pre.proc.wait(timeout=10)
        started = time.monotonic()
        results = decode_many(dec.grpc_address, jobs, timeout_s=60)
        elapsed = time.monotonic() - started
        for (rest, error), (_, first, _), i in zip(results, jobs, picks, strict=True):
            if policy == "recompute":
                assert error is None, error
                assert [first, *rest] == expected[i]
            else:
                assert error is not None and "KV transfer failed" in error and "holder_unreachable" in error
                assert rest == []
        assert elapsed < 30  # the fetch deadline; a dead holder is detected at connect, much sooner
        text = metrics(dec.metrics_port)
        assert metric_value(text, "kvrelay_kv_transfer_failures_total", reason="holder_unreachable") == len(
            picks
        )
        # recompute: the decode computed the prompts itself (the first token's KV is not a prompt token)
        recomputed = sum(len(prompts[i]) for i in picks) if policy == "recompute" else 0
        assert metric_value(text, "kvrelay_prompt_tokens_computed_total", role="decode") == recomputed
        assert wait_metric(dec.metrics_port, "kvrelay_kv_cache_usage_ratio", 0, role="decode") == 0


def test_unread_handle_is_freed_at_lease_expiry(model_dir: Path, prompts: list[list[int]]) -> None:
    """The decode that should read the blocks is gone: the prefill frees them when the lease ends."""
    with run_worker(
        "prefill", model_dir, "--num-blocks", "64", "--kv-lease-s", "1.5", kv_backend="tcp"
    ) as pre:
        _, handle = prefill(pre.grpc_address, prompts[19])
        held = metric_value(metrics(pre.metrics_port), "kvrelay_kv_held_blocks", role="prefill")
        assert held == 7  # 100 tokens in blocks of 16
        assert metric_value(metrics(pre.metrics_port), "kvrelay_kv_cache_usage_ratio", role="prefill") > 0
        assert wait_metric(pre.metrics_port, "kvrelay_kv_held_blocks", 0, timeout_s=10, role="prefill") == 0
        assert wait_metric(pre.metrics_port, "kvrelay_kv_held_bytes", 0, role="prefill") == 0
        assert wait_metric(pre.metrics_port, "kvrelay_kv_cache_usage_ratio", 0, role="prefill") == 0
        assert json.loads(handle)["lease_expires_at"] < time.time()
