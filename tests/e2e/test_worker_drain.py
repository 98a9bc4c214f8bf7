"""A worker drains on SIGTERM: /ready fails at once, new work is refused (ModelInfer with the drain
status, stream requests in-band), running streams and held KV leases are seen through, what outlives
the deadline ends with "deadline passed", and the process exits 0 (real worker processes, the
official tritonclient)."""

from __future__ import annotations

import queue
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from kvrelay_worker.model import load_model
from kvrelay_worker.model.tiny import make_tiny_model
from kvrelay_worker.server.drain import DEADLINE_MESSAGE, DRAINING_MESSAGE
from tritonclient.utils import InferenceServerException
from worker_fixtures import (
    WorkerProcess,
    decode_inputs,
    metric_value,
    prefill_inputs,
    run_worker,
    run_workers,
)

pytestmark = pytest.mark.e2e
UNAVAILABLE = "StatusCode.UNAVAILABLE"
PROMPTS = [list(range(20, 45)), list(range(100, 117)), [7, 300, 42, 9, 250, 11], list(range(400, 440))]
FIRST_TOKEN = 5  # decode recomputes prompt + this token when the handle is empty
RELAY_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-drain"))


@dataclass
class Stream:
    """One decode request on its own stream (as the router sends them), read on tritonclient's thread."""

    address: str
    client: grpcclient.InferenceServerClient = field(init=False)
    events: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: InferenceServerException | None = None

    def __post_init__(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.address)
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, prompt: list[int], first: int, handle: bytes = b"", **sampling: object) -> None:
        inputs = decode_inputs(grpcclient, prompt, first, handle, ignore_eos=True, **sampling)
        self.client.async_stream_infer("kvrelay_decode", inputs, request_id="r")

    def pump(self, timeout_s: float = 0.0) -> bool:
        """Take what arrived (waiting up to ``timeout_s`` for one event); True once the request ended."""
        wait = timeout_s
        while not self.done:
            try:
                result, error = self.events.get(timeout=wait) if wait > 0 else self.events.get_nowait()
            except queue.Empty:
                break
            wait = 0.0  # then whatever else is already there
            if error is not None:
                self.error = error
                break
            response = result.get_response()
            if "token_id" in {o.name for o in response.outputs}:
                self.tokens.append(int(result.as_numpy("token_id")[0]))
            if response.parameters["triton_final_response"].bool_param:
                self.finish_reason = response.parameters["finish_reason"].string_param
        return self.done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def finish(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.pump(timeout_s=1.0):
            assert time.monotonic() < deadline, f"stream still open after {timeout_s} s ({len(self.tokens)})"
        self.client.stop_stream()
        self.client.close()


def start_streams(address: str, max_tokens: int) -> list[Stream]:
    streams = [Stream(address) for _ in PROMPTS]
    for stream, prompt in zip(streams, PROMPTS, strict=True):
        stream.send(prompt, FIRST_TOKEN, max_tokens=max_tokens)
    return streams


def wait_all_running(streams: list[Stream], timeout_s: float = 60.0) -> None:
    """Until every stream has its first token: all are admitted and in the batch."""
    deadline = time.monotonic() + timeout_s
    while not all(s.tokens for s in streams):
        assert time.monotonic() < deadline, "streams did not start"
        for s in streams:
            s.pump(timeout_s=0.05)
            assert not s.done, f"a stream ended before the drain began: {s.error or s.finish_reason}"


def ready_status(worker: WorkerProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/ready", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def metrics(worker: WorkerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def assert_draining_refusal(exc: InferenceServerException) -> None:
    assert exc.status() == UNAVAILABLE and exc.message() == DRAINING_MESSAGE, exc


def wait_exit(worker: WorkerProcess, timeout_s: float) -> int:
    return worker.proc.wait(timeout=timeout_s)


def test_decode_drain_finishes_running_streams_and_refuses_new_ones(model_dir: Path) -> None:
    max_tokens = 1500  # long enough that the refusals below land while these streams still run
    with run_worker("decode", model_dir, "--drain-seconds", "60") as worker:
        assert ready_status(worker) == 200
        undrained = start_streams(worker.grpc_address, max_tokens)
        for s in undrained:
            s.finish()
        assert all(s.error is None and len(s.tokens) == max_tokens - 1 for s in undrained)  # + the first

        idle = Stream(worker.grpc_address)  # opened before the drain, sends its request during it
        streams = start_streams(worker.grpc_address, max_tokens)
        wait_all_running(streams)
        worker.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while ready_status(worker) != 503:
            assert time.monotonic() - signalled < 2, "/ready still 200 after SIGTERM"
            time.sleep(0.01)
        health = grpcclient.InferenceServerClient(worker.grpc_address)
        assert not health.is_server_ready() and not health.is_model_ready("kvrelay_decode")
        assert health.is_server_live()
        health.close()
        # A stream opened during the drain and one opened before it: both refuse in-band (a status that
        # ended the new stream while its request was being written could be lost on the client).
        late = Stream(worker.grpc_address)
        late.send(PROMPTS[0], FIRST_TOKEN, max_tokens=4)
        idle.send(PROMPTS[0], FIRST_TOKEN, max_tokens=4)
        for refused in (late, idle):
            refused.finish(timeout_s=10)
            assert refused.error is not None and refused.error.message() == DRAINING_MESSAGE, refused.error
            assert not refused.tokens
        assert not any(s.pump() for s in streams), "the refusals came too late to prove anything"

        for s in streams:
            s.finish()
        for i, (s, ref) in enumerate(zip(streams, undrained, strict=True)):
            assert s.error is None and s.finish_reason == "length", f"stream {i}: {s.error}"
            assert s.tokens == ref.tokens, f"stream {i} differs from the undrained run"
        code = wait_exit(worker, timeout_s=30)
        assert code == 0, worker.log()
        log = worker.log(200)
        assert "drain started: 4 request(s) running" in log and "drain finished" in log, log
        assert time.monotonic() - signalled < 60


@pytest.fixture(scope="module")
def relay_expected(model_dir: Path) -> list[list[int]]:
    """Greedy tokens by full forward passes (no KV cache): what prefill + relayed decode must produce."""
    model = load_model(model_dir)
    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids, tokens = torch.tensor([prompt]), []
            for _ in range(RELAY_TOKENS):
                token = int(model.full_forward_logits(ids)[0, -1].argmax())
                tokens.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            out.append(tokens)
    return out


def test_prefill_drain_serves_held_kv_until_claimed(model_dir: Path, relay_expected: list[list[int]]) -> None:
    drain = ("--drain-seconds", "60", "--kv-lease-s", "30")
    specs = [("decode", model_dir, ()), ("prefill", model_dir, drain)]
    with run_workers(specs) as (decode, prefill):
        client = grpcclient.InferenceServerClient(prefill.grpc_address)
        held = []
        for prompt in PROMPTS:
            res = client.infer(
                "kvrelay_prefill",
                prefill_inputs(grpcclient, prompt, max_tokens=RELAY_TOKENS, ignore_eos=True),
            )
            held.append((int(res.as_numpy("token_id")[0]), res.as_numpy("kv_handle")[0]))
        assert metric_value(metrics(prefill), "kvrelay_kv_held_blocks", role="prefill") > 0

        prefill.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while ready_status(prefill) != 503:
            assert time.monotonic() - signalled < 2, "/ready still 200 after SIGTERM"
            time.sleep(0.01)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("kvrelay_prefill", prefill_inputs(grpcclient, PROMPTS[0], max_tokens=2))
        assert_draining_refusal(refused.value)
        client.close()
        time.sleep(1.0)
        assert prefill.proc.poll() is None, "the prefill worker left with unclaimed KV:\n" + prefill.log()

        streams = [Stream(decode.grpc_address) for _ in PROMPTS]
        for s, prompt, (first, handle) in zip(streams, PROMPTS, held, strict=True):
            s.send(prompt, first, handle, max_tokens=RELAY_TOKENS)
        for i, (s, (first, _), want) in enumerate(zip(streams, held, relay_expected, strict=True)):
            s.finish()
            assert s.error is None and [first, *s.tokens] == want, f"prompt {i}: {s.error}"
        text = metrics(decode)
        assert metric_value(text, "kvrelay_kv_transfer_failures_total") is None
        assert metric_value(text, "kvrelay_kv_transfer_seconds_count", role="decode") == len(PROMPTS)
        # The decode worker computed no prompt token: every prompt's KV came from the draining prefill.
        assert metric_value(text, "kvrelay_prompt_tokens_computed_total", role="decode") == 0

        code = wait_exit(prefill, timeout_s=20)
        assert code == 0, prefill.log()
        assert time.monotonic() - signalled < 30, "exited by lease expiry, not once the KV was claimed"
        assert "drain started: 0 request(s) running, 4 KV lease(s) held" in prefill.log(200)


@pytest.mark.parametrize(
    ("drain_seconds", "signals"), [("0.5", 1), ("60", 2)], ids=["deadline", "second-signal"]
)
def test_what_outlives_the_drain_ends_with_deadline_passed(
    model_dir: Path, drain_seconds: str, signals: int
) -> None:
    max_tokens = 2000  # several seconds at batch 4 on the CPU, far beyond a 0.5 s drain
    with run_worker("decode", model_dir, "--drain-seconds", drain_seconds) as worker:
        streams = start_streams(worker.grpc_address, max_tokens)
        wait_all_running(streams)
        signalled = time.monotonic()
        for _ in range(signals):
            worker.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        for i, s in enumerate(streams):
            s.finish(timeout_s=30)
            assert s.error is not None, f"stream {i} finished ({s.finish_reason}) before the deadline"
            assert s.error.status() == UNAVAILABLE and s.error.message() == DEADLINE_MESSAGE, s.error
            assert 0 < len(s.tokens) < max_tokens
        code = wait_exit(worker, timeout_s=30)
        assert code == 0, worker.log()
        assert time.monotonic() - signalled < 15
        reason = "deadline" if signals == 1 else "cut short"
        assert f"drain {reason} after" in worker.log(200) and "ending 4 request(s)" in worker.log(200)
