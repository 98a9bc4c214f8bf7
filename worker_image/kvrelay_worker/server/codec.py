"""KServe v2 tensor encoding: read request inputs, build responses. Pure functions, no I/O."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb


class BadRequest(ValueError):
    """A malformed inference request; its message goes back to the client in-band."""


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensors are <uint32 little-endian length><bytes> per element."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise BadRequest("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def read_inputs(req: pb.ModelInferRequest) -> dict[str, Any]:
    """Decode inputs to {name: np.ndarray (INT64) | list[bytes] (BYTES)}, raw or typed contents."""
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise BadRequest(
            f"{len(req.inputs)} inputs but {len(req.raw_input_contents)} raw_input_contents entries"
        )
    out: dict[str, Any] = {}
    for i, tensor in enumerate(req.inputs):
        raw = req.raw_input_contents[i] if req.raw_input_contents else None
        if tensor.datatype == "INT64":
            if raw is not None:
                if len(raw) % 8:
                    raise BadRequest(
                        f"input {tensor.name!r}: {len(raw)} bytes is not a whole number of INT64"
                    )
                value = np.frombuffer(raw, dtype="<i8")
            else:
                value = np.asarray(tensor.contents.int64_contents, dtype=np.int64)
        elif tensor.datatype == "BYTES":
            value = _bytes_elements(raw) if raw is not None else list(tensor.contents.bytes_contents)
        else:
            raise BadRequest(
                f"input {tensor.name!r}: datatype {tensor.datatype} not accepted (INT64 or BYTES)"
            )
        expected = int(np.prod(tensor.shape)) if len(tensor.shape) else len(value)
        if expected != len(value):
            raise BadRequest(f"input {tensor.name!r}: shape {list(tensor.shape)} but {len(value)} elements")
        out[tensor.name] = value
    return out


def require(inputs: dict[str, Any], name: str, datatype: str, size: int | None = None) -> Any:
    """Fetch a required input, checking kind and (optionally) element count."""
    if name not in inputs:
        raise BadRequest(f"missing input {name!r} ({datatype}); got {sorted(inputs)}")
    value = inputs[name]
    is_int = isinstance(value, np.ndarray)
    if is_int != (datatype == "INT64"):
        raise BadRequest(f"input {name!r} must be {datatype}")
    if size is not None and len(value) != size:
        raise BadRequest(f"input {name!r} must have {size} element(s), got {len(value)}")
    return value


_DATATYPES = {np.dtype(np.int64): ("INT64", "<i8"), np.dtype(np.float32): ("FP32", "<f4")}


def infer_response(
    req: pb.ModelInferRequest,
    int64_outputs: dict[str, list[int]],
    bytes_outputs: dict[str, list[bytes]] | None = None,
    params: dict[str, Any] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
) -> pb.ModelInferResponse:
    """A ModelInferResponse: 1-D INT64 and BYTES outputs, then ``arrays`` (int64 or float32, any shape)."""
    resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
    for name, values in int64_outputs.items():
        resp.outputs.add(name=name, datatype="INT64", shape=[len(values)])
        resp.raw_output_contents.append(np.asarray(values, dtype="<i8").tobytes())
    for name, items in (bytes_outputs or {}).items():
        resp.outputs.add(name=name, datatype="BYTES", shape=[len(items)])
        resp.raw_output_contents.append(encode_bytes(items))
    for name, array in (arrays or {}).items():
        datatype, wire = _DATATYPES[array.dtype]
        resp.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        resp.raw_output_contents.append(array.astype(wire, copy=False).tobytes())
    for key, value in (params or {}).items():
        if isinstance(value, bool):
            resp.parameters[key].bool_param = value
        elif isinstance(value, int):
            resp.parameters[key].int64_param = value
        else:
            resp.parameters[key].string_param = str(value)
    return resp


def stream_error(req_id: str, model_name: str, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=req_id, model_name=model_name)
    )
