"""Server pieces without sockets: KServe tensor codec, the engine thread's failure path."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from kvrelay_worker.engine import EngineStats, SamplingParams
from kvrelay_worker.server.codec import BadRequest, encode_bytes, infer_response, read_inputs, require
from kvrelay_worker.server.engine_loop import EngineFailed, EngineLoop
from kvrelay_worker.server.servicer import parse_sampling
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
        q = loop.subscribe("r")
        await loop.call(loop.engine.add_decode_request, "r", [1], 2, SamplingParams(), 0.0)
        item = await asyncio.wait_for(q.get(), 10)
        assert isinstance(item, EngineFailed) and "device-side assert" in str(item)
        assert not loop.healthy
    finally:
        loop.stop()
