"""Server pieces without sockets: KServe tensor codec, the engine thread's failure path, the KV bridge."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kvrelay_worker.engine import EngineStats, KVTarget, RequestOutput, SamplingParams, TokenLogprobs
from kvrelay_worker.kv import KVMetrics
from kvrelay_worker.kv.leases import Lease, LeaseTable
from kvrelay_worker.server.codec import BadRequest, encode_bytes, infer_response, read_inputs, require
from kvrelay_worker.server.engine_loop import EngineChannel, EngineFailed, EngineLoop
from kvrelay_worker.server.kv_bridge import KVBridge
from kvrelay_worker.server.servicer import parse_sampling, prompt_logprob_outputs, token_logprob_outputs
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb


def _request(raw: bool) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="kvrelay_prefill", id="r1")
    ids = req.inputs.add(name="input_ids", datatype="INT64", shape=[3])
    s = req.inputs.add(name="sampling", datatype="BYTES", shape=[1])
    if raw:
        req.raw_input_contents.append(np.array([5, 6, 7], dtype="<i8").tobytes())
        req.raw_input_contents.append(encode_bytes([b'{"max_tokens": 4}']))
    else:
        ids.contents.int64_contents.extend([5, 6, 7])
        s.contents.bytes_contents.append(b'{"max_tokens": 4}')
    return req


@pytest.mark.parametrize("raw", [True, False])
def test_read_inputs_raw_and_typed(raw: bool) -> None:
    inputs = read_inputs(_request(raw))
    assert require(inputs, "input_ids", "INT64").tolist() == [5, 6, 7]
    assert parse_sampling(require(inputs, "sampling", "BYTES", 1)) == SamplingParams(max_tokens=4)


def test_codec_errors_are_bad_requests() -> None:
    req = _request(True)
    req.inputs[0].shape[:] = [4]
    with pytest.raises(BadRequest, match="shape \\[4\\] but 3 elements"):
        read_inputs(req)
    req = _request(True)
    req.raw_input_contents[1] = struct.pack("<I", 50) + b"short"[:2]
    inputs = read_inputs(req)  # a short element is returned as is; the JSON then fails cleanly
    with pytest.raises(BadRequest, match="invalid sampling JSON"):
        parse_sampling(inputs["sampling"])
    req = _request(True)
    req.inputs[0].datatype = "FP32"
    with pytest.raises(BadRequest, match="datatype FP32"):
        read_inputs(req)
    with pytest.raises(BadRequest, match="missing input 'first_token'"):
        require(read_inputs(_request(True)), "first_token", "INT64", 1)
    with pytest.raises(BadRequest, match="temperature"):
        parse_sampling([b'{"temperature": -1}'])


def test_infer_response_round_trip() -> None:
    req = _request(True)
    resp = infer_response(req, {"token_id": [42]}, {"kv_handle": [b"{}"]}, {"triton_final_response": True})
    assert resp.id == "r1" and [o.name for o in resp.outputs] == ["token_id", "kv_handle"]
    assert np.frombuffer(resp.raw_output_contents[0], dtype="<i8").tolist() == [42]
    assert resp.parameters["triton_final_response"].bool_param


def test_logprob_tensors_have_the_contract_shapes() -> None:
    """FP32 and INT64 outputs with explicit shapes; k = 0 gives [1, 0]; nothing when not asked."""
    entry = TokenLogprobs(9, -0.5, (9, 3), (-0.5, -1.25))
    arrays = token_logprob_outputs(SamplingParams(logprobs=2), entry)
    prompt = [TokenLogprobs(t, -2.0, (), ()) for t in (4, 5, 6)]
    out = RequestOutput("r", [9], False, prompt_logprobs=prompt)
    arrays |= prompt_logprob_outputs(SamplingParams(prompt_logprobs=0), out)
    resp = infer_response(_request(True), {"token_id": [9]}, arrays=arrays)
    shapes = {o.name: (o.datatype, list(o.shape)) for o in resp.outputs}
    assert shapes == {
        "token_id": ("INT64", [1]),
        "logprob": ("FP32", [1]),
        "top_token_ids": ("INT64", [1, 2]),
        "top_logprobs": ("FP32", [1, 2]),
        "prompt_logprobs": ("FP32", [3]),
        "prompt_top_token_ids": ("INT64", [3, 0]),
        "prompt_top_logprobs": ("FP32", [3, 0]),
    }
    raw = dict(zip([o.name for o in resp.outputs], resp.raw_output_contents, strict=True))
    assert np.frombuffer(raw["top_logprobs"], dtype="<f4").tolist() == [-0.5, -1.25]
    assert np.frombuffer(raw["top_token_ids"], dtype="<i8").tolist() == [9, 3]
    assert raw["prompt_top_logprobs"] == b""
    assert (
        token_logprob_outputs(SamplingParams(), None) == {} == prompt_logprob_outputs(SamplingParams(), out)
    )


class _CrashingEngine:
    def __init__(self) -> None:
        self.work = False

    def add_decode_request(self, *args, **kwargs) -> None:
        self.work = True

    def has_work(self) -> bool:
        return self.work

    def step(self, now: float):
        raise RuntimeError("CUDA error: device-side assert")

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0.0, 0)


async def test_engine_thread_crash_fails_waiting_requests() -> None:
    loop = EngineLoop(_CrashingEngine(), asyncio.get_running_loop())  # type: ignore[arg-type]
    loop.start()
    try:
        q = loop.channel.subscribe("r")
        await loop.channel.call(loop.engine.add_decode_request, "r", [1], 2, SamplingParams(), 0.0)
        item = await asyncio.wait_for(q.get(), 10)
        assert isinstance(item, EngineFailed) and "device-side assert" in str(item)
        assert not loop.healthy
    finally:
        loop.stop()


class _IdleEngine:
    """Engine stand-in for the KV bridge: a real cache tensor; records the bridge's engine calls."""

    def __init__(self) -> None:
        self.kv_cache = torch.arange(2 * 2 * 8 * 4, dtype=torch.float32).reshape(2, 2, 8, 1, 1, 4)
        self.calls: list[tuple] = []

    def has_work(self) -> bool:
        return False

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0.0, 0)

    def remote_kv_done(self, request_id: str, ok: bool) -> None:
        self.calls.append(("remote_kv_done", request_id, ok))

    def abort(self, request_id: str) -> bool:
        self.calls.append(("abort", request_id))
        return True

    def release(self, request_id: str) -> bool:
        self.calls.append(("release", request_id))
        return True


def _colocated(policy: str, held: list[int] | None):
    """A colocated bridge over a fake transport whose lease table holds ``held`` (None: no lease)."""
    registry = CollectorRegistry()
    transport = SimpleNamespace(
        agent_name="me", leases=LeaseTable(), metrics=KVMetrics("m", "colocated", registry=registry)
    )
    handle = SimpleNamespace(handle_id="h1", holder=SimpleNamespace(agent_name="me"), num_tokens=5)
    engine = _IdleEngine()
    if held is not None:
        transport.leases.add(Lease(handle, held, 0, float("inf"), lambda _ids: engine.release("p")))  # type: ignore[arg-type]
    bridge = KVBridge(engine, EngineChannel(), transport, role="colocated", failure_policy=policy)  # type: ignore[arg-type]
    return bridge, engine, handle, registry


def _failures(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value(
        "kvrelay_kv_transfer_failures_total", {"model": "m", "role": "colocated", "reason": reason}
    )


async def _run_target(bridge: KVBridge, engine: _IdleEngine, handle, target: KVTarget) -> asyncio.Queue:
    loop = EngineLoop(
        engine, asyncio.get_running_loop(), on_kv_target=bridge.on_kv_target, channel=bridge.channel
    )  # type: ignore[arg-type]
    loop.start()
    try:
        q = bridge.channel.subscribe(target.request_id)
        bridge.expect(target.request_id, handle)
        loop._deliver([], [target])
        for _ in range(200):
            await asyncio.sleep(0.01)
            if any(c[0] in ("remote_kv_done", "abort") for c in engine.calls):
                break
        return q
    finally:
        loop.stop()


async def test_colocated_handoff_copies_blocks_and_releases_the_lease() -> None:
    bridge, engine, handle, registry = _colocated("fail", held=[1, 2])
    source = engine.kv_cache[:, :, [1, 2]].clone()
    await _run_target(bridge, engine, handle, KVTarget("d", [5, 6], 5))
    assert torch.equal(engine.kv_cache[:, :, [5, 6]], source)
    assert engine.calls == [("release", "p"), ("remote_kv_done", "d", True)]
    assert len(bridge.transport.leases) == 0 and _failures(registry, "layout_mismatch") is None


async def test_colocated_handoff_failure_is_counted_and_ends_the_request_under_fail() -> None:
    bridge, engine, handle, registry = _colocated("fail", held=[1, 2])
    before = engine.kv_cache.clone()
    q = await _run_target(bridge, engine, handle, KVTarget("d", [5, 6, 7], 5))  # 3 blocks for 2 held
    assert torch.equal(engine.kv_cache, before)  # nothing written
    item = q.get_nowait()
    assert isinstance(item, EngineFailed) and "KV transfer failed: layout_mismatch" in str(item)
    assert ("abort", "d") in engine.calls and ("release", "p") in engine.calls  # lease let go too
    assert _failures(registry, "layout_mismatch") == 1


@pytest.mark.parametrize(("held", "reason"), [(None, "unknown_handle"), ([1, 99], "transfer_error")])
async def test_colocated_handoff_failure_recomputes_under_recompute(held, reason: str) -> None:
    bridge, engine, handle, registry = _colocated("recompute", held=held)  # 99: outside the cache
    await _run_target(bridge, engine, handle, KVTarget("d", [5, 6], 5))
    assert ("remote_kv_done", "d", False) in engine.calls
    assert _failures(registry, reason) == 1


async def test_kv_target_without_a_handle_recomputes() -> None:
    bridge, engine, _, _ = _colocated("fail", held=None)
    loop = EngineLoop(
        engine, asyncio.get_running_loop(), on_kv_target=bridge.on_kv_target, channel=bridge.channel
    )  # type: ignore[arg-type]
    loop.start()
    try:
        loop._deliver([], [KVTarget("gone", [1], 5)])  # aborted before its blocks came
        await bridge.channel.call(lambda: None)  # the recompute call ran before this one
        assert engine.calls == [("remote_kv_done", "gone", False)]
    finally:
        loop.stop()
