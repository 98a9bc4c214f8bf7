"""KServe v2 (Triton) gRPC servicer for the prefill, decode and colocated roles (contract section 3).

Protocol only: decode the request, call the engine (through the engine loop's channel), encode
the answer. What happens to a request's KV cache between the roles is the ``KVBridge``'s; when to
stop admitting and to end what runs is the drain's (``server/drain.py``, driven by ``app.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from kvrelay_worker.engine import Engine, RequestOutput, RequestRefused, SamplingParams, TokenLogprobs
from kvrelay_worker.kserve_models import DECODE_MODEL, PREFILL_MODEL
from kvrelay_worker.metrics import WorkerMetrics
from kvrelay_worker.server.codec import BadRequest, infer_response, read_inputs, require, stream_error
from kvrelay_worker.server.drain import DRAIN_STATUS, DRAINING_MESSAGE
from kvrelay_worker.server.engine_loop import EngineFailed, EngineLoop, WorkerGone
from kvrelay_worker.server.kv_bridge import KVBridge, Role

log = logging.getLogger(__name__)

STREAM_QUEUE_SIZE = 64  # bounded: a slow reader applies backpressure instead of growing latency

_TENSOR = pb.ModelMetadataResponse.TensorMetadata
_INPUTS = {
    PREFILL_MODEL: [("input_ids", "INT64", [-1]), ("sampling", "BYTES", [1])],
    DECODE_MODEL: [
        ("input_ids", "INT64", [-1]),
        ("first_token", "INT64", [1]),
        ("kv_handle", "BYTES", [1]),
        ("sampling", "BYTES", [1]),
    ],
}
# the logprob outputs come only when ``sampling`` asks (contract section 3)
_TOKEN_LOGPROBS = [
    ("logprob", "FP32", [1]),
    ("top_token_ids", "INT64", [1, -1]),
    ("top_logprobs", "FP32", [1, -1]),
]
_OUTPUTS = {
    PREFILL_MODEL: [
        ("token_id", "INT64", [1]),
        ("kv_handle", "BYTES", [1]),
        ("finish_reason", "BYTES", [1]),
        *_TOKEN_LOGPROBS,
        ("prompt_logprobs", "FP32", [-1]),
        ("prompt_top_token_ids", "INT64", [-1, -1]),
        ("prompt_top_logprobs", "FP32", [-1, -1]),
    ],
    DECODE_MODEL: [("token_id", "INT64", [1]), *_TOKEN_LOGPROBS],
}


class _Draining(Exception):
    """A request arrived after the drain began: refused with ``DRAINING_MESSAGE``."""


@dataclass(frozen=True)
class _StreamEnd:
    """Put into a stream's queue: end the whole RPC with the drain status and this message."""

    message: str


def models_for_role(role: Role) -> list[str]:
    return {"prefill": [PREFILL_MODEL], "decode": [DECODE_MODEL], "colocated": [PREFILL_MODEL, DECODE_MODEL]}[
        role
    ]


def logprob_arrays(entries: list[TokenLogprobs], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logprobs FP32 [n], top ids INT64 [n, k], top logprobs FP32 [n, k]) of ``n`` scored positions."""
    n = len(entries)
    return (
        np.array([e.logprob for e in entries], dtype=np.float32),
        np.array([e.top_ids for e in entries], dtype=np.int64).reshape(n, k),
        np.array([e.top_logprobs for e in entries], dtype=np.float32).reshape(n, k),
    )


def token_logprob_outputs(params: SamplingParams, entry: TokenLogprobs | None) -> dict[str, np.ndarray]:
    """``logprob`` [1], ``top_token_ids`` and ``top_logprobs`` [1, k] of one generated token, if asked."""
    if params.logprobs is None:
        return {}
    if entry is None:  # the engine scores every token of a request that asked: a bug, not the client's
        raise RuntimeError("the engine returned a token without the logprobs the request asked for")
    value, ids, tops = logprob_arrays([entry], params.logprobs)
    return {"logprob": value, "top_token_ids": ids, "top_logprobs": tops}


def prompt_logprob_outputs(params: SamplingParams, out: RequestOutput) -> dict[str, np.ndarray]:
    """``prompt_logprobs`` [n-1], ``prompt_top_token_ids`` and ``prompt_top_logprobs`` [n-1, k], if asked."""
    if params.prompt_logprobs is None:
        return {}
    if out.prompt_logprobs is None:
        raise RuntimeError("the engine returned a first token without the prompt logprobs asked for")
    value, ids, tops = logprob_arrays(out.prompt_logprobs, params.prompt_logprobs)
    return {"prompt_logprobs": value, "prompt_top_token_ids": ids, "prompt_top_logprobs": tops}


def parse_sampling(raw: list[bytes]) -> SamplingParams:
    try:
        return SamplingParams.model_validate_json(raw[0] or b"{}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'sampling'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"invalid sampling JSON: {problems}") from None


class WorkerServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``kv`` is None only for a worker that relays no KV (decode requests then need an empty handle)."""

    def __init__(
        self,
        role: Role,
        engine_loop: EngineLoop,
        kv: KVBridge | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.role = role
        self.kserve_models = models_for_role(role)  # KServe model names, not the served model's name
        self.engine_loop = engine_loop
        self.engine: Engine = engine_loop.engine
        self.channel = engine_loop.channel
        self.kv = kv
        self.metrics = metrics
        self.ready = False  # set once the gRPC server is up (the model is loaded by then)
        self.draining = False  # set on SIGTERM: admit nothing more
        self.active = 0  # admitted requests not finished yet (the drain waits for them)
        self._streams: set[asyncio.Queue] = set()  # each open ModelStreamInfer's response queue

    @property
    def readiness(self) -> str:
        """``serving``, or why not: what ``/ready``, ServerReady and ModelReady report."""
        if not self.engine_loop.healthy:
            return "engine failed"
        if self.draining:
            return "draining"
        return "serving" if self.ready else "not loaded"

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count a request in flight; checked and counted in one go on the event loop, so a request is
        either refused or waited for by the drain."""
        if self.draining:
            raise _Draining(DRAINING_MESSAGE)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def end_streams(self, message: str, cut_off: bool) -> None:
        """End every open stream with the drain status once the tokens already queued are out.

        ``cut_off`` (deadline): also end the requests still running, ModelInfer ones included. A
        stream whose reader lags a full queue behind loses those tokens rather than holding the exit.
        """
        for out in self._streams:
            try:
                out.put_nowait(_StreamEnd(message))
            except asyncio.QueueFull:
                if not cut_off:
                    continue  # its requests are done; the server's stop grace ends it
                while not out.empty():
                    out.get_nowait()
                out.put_nowait(_StreamEnd(message))
        if cut_off:
            self.channel.fail_all(message, WorkerGone)

    # ---- health and metadata -----------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.readiness == "serving")

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=f"kvrelay-worker-{self.role}", version="0.1.0", extensions=[])

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.readiness == "serving" and request.name in self.kserve_models)

    async def ModelMetadata(self, request, context):
        name = await self._model_or_abort(request.name, context)
        return pb.ModelMetadataResponse(
            name=name,
            versions=["1"],
            platform="kvrelay",
            inputs=[_TENSOR(name=n, datatype=d, shape=s) for n, d, s in _INPUTS[name]],
            outputs=[_TENSOR(name=n, datatype=d, shape=s) for n, d, s in _OUTPUTS[name]],
        )

    async def ModelConfig(self, request, context):
        name = await self._model_or_abort(request.name, context)
        cfg = mc.ModelConfig(name=name, platform="kvrelay", backend="kvrelay", max_batch_size=0)
        for n, d, s in _INPUTS[name]:
            cfg.input.add(name=n, data_type=getattr(mc, f"TYPE_{'STRING' if d == 'BYTES' else d}"), dims=s)
        for n, d, s in _OUTPUTS[name]:
            cfg.output.add(name=n, data_type=getattr(mc, f"TYPE_{'STRING' if d == 'BYTES' else d}"), dims=s)
        cfg.model_transaction_policy.decoupled = name == DECODE_MODEL
        return pb.ModelConfigResponse(config=cfg)

    async def _model_or_abort(self, name: str, context) -> str:
        if name not in self.kserve_models:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} not served by this {self.role} worker ({self.kserve_models})",
            )
        return name

    # ---- inference ----------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        if request.model_name == DECODE_MODEL and DECODE_MODEL in self.kserve_models:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "ModelInfer RPC doesn't support models with decoupled transaction policy; "
                "use ModelStreamInfer",
            )
        await self._model_or_abort(request.model_name, context)
        try:
            with self._admitted():
                return await self._prefill(request)
        except (BadRequest, RequestRefused) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (_Draining, WorkerGone) as exc:
            await context.abort(DRAIN_STATUS, str(exc))

    async def ModelStreamInfer(self, request_iterator, context):
        """Many requests per stream; one writer (this generator) drains a bounded queue.

        While draining, each request is refused in-band, a stream opened during the drain too: ending
        a bidirectional call with a status while the client is still writing loses that status on the
        client (grpc reports INTERNAL "Internal error from Core"), and the router would not know that
        the worker is draining.
        """
        out: asyncio.Queue[pb.ModelStreamInferResponse | _StreamEnd | None] = asyncio.Queue(
            maxsize=STREAM_QUEUE_SIZE
        )
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                with self._admitted():
                    await self._stream_request(req, out)
            except (BadRequest, RequestRefused, _Draining) as exc:
                # In-band, also a drain refusal: the stream's other requests may still be running.
                await out.put(stream_error(req.id, req.model_name, str(exc)))
            except WorkerGone:
                pass  # the drain deadline: end_streams ends the whole stream with the drain status
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # in-band, the stream stays usable
                log.exception("stream request %s failed", req.id)
                await out.put(stream_error(req.id, req.model_name, f"internal error: {exc}"))

        async def reader() -> None:
            async for req in request_iterator:
                task = asyncio.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(None)

        reader_task = asyncio.create_task(reader())
        self._streams.add(out)
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, _StreamEnd):
                    await context.abort(DRAIN_STATUS, item.message)
                yield item
        finally:
            self._streams.discard(out)
            reader_task.cancel()
            for task in list(tasks):
                task.cancel()  # the client went away: abort its requests in the engine
            await asyncio.gather(reader_task, *tasks, return_exceptions=True)

    async def _stream_request(self, req: pb.ModelInferRequest, out: asyncio.Queue) -> None:
        if req.model_name not in self.kserve_models:
            raise BadRequest(f"model {req.model_name!r} not served by this {self.role} worker")
        if req.model_name == PREFILL_MODEL:
            resp = await self._prefill(req)
            resp.parameters["triton_final_response"].bool_param = True
            await out.put(pb.ModelStreamInferResponse(infer_response=resp))
        else:
            await self._decode(req, lambda r: out.put(pb.ModelStreamInferResponse(infer_response=r)))

    # ---- prefill ---------------------------------------------------------------------------------------
    async def _prefill(self, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
        inputs = read_inputs(req)
        input_ids = require(inputs, "input_ids", "INT64").tolist()
        params = parse_sampling(require(inputs, "sampling", "BYTES", 1))
        rid = uuid.uuid4().hex
        queue = self.channel.subscribe(rid)
        try:
            await self.channel.call(self.engine.add_request, rid, input_ids, params, time.monotonic(), True)
            self._count_prompt(len(input_ids))
            out = await queue.get()
            if isinstance(out, WorkerGone):
                raise out
            if isinstance(out, EngineFailed):
                raise BadRequest(str(out))
        except (asyncio.CancelledError, WorkerGone):
            self.channel.call_soon(self._abort_or_release, rid)
            raise
        finally:
            self.channel.unsubscribe(rid)
        self._observe_first(out)
        token = out.new_token_ids[0]
        arrays = {
            **token_logprob_outputs(params, out.logprobs[0] if out.logprobs else None),
            **prompt_logprob_outputs(params, out),
        }
        if out.finished:
            return infer_response(
                req,
                {"token_id": [token]},
                {"kv_handle": [b""], "finish_reason": [out.finish_reason.encode()]},
                arrays=arrays,
            )
        if self.kv is None:
            self.channel.call_soon(self.engine.release, rid)
            raise BadRequest("this worker relays no KV cache")
        handle = self.kv.publish(rid, out)
        return infer_response(
            req,
            {"token_id": [token]},
            {"kv_handle": [handle.to_json()], "finish_reason": [b""]},
            arrays=arrays,
        )

    def _abort_or_release(self, rid: str) -> None:
        if not self.engine.release(rid):
            self.engine.abort(rid)

    # ---- decode -----------------------------------------------------------------------------------------
    async def _decode(
        self, req: pb.ModelInferRequest, emit: Callable[[pb.ModelInferResponse], Awaitable]
    ) -> None:
        inputs = read_inputs(req)
        input_ids = require(inputs, "input_ids", "INT64").tolist()
        first = int(require(inputs, "first_token", "INT64", 1)[0])
        raw_handle = require(inputs, "kv_handle", "BYTES", 1)[0]
        params = parse_sampling(require(inputs, "sampling", "BYTES", 1))
        if params.prompt_logprobs is not None:  # the prompt was scored where it was prefilled
            raise BadRequest(f"prompt_logprobs is answered by the prefill model only ({PREFILL_MODEL})")
        empty_final = (
            "triton_enable_empty_final_response" in req.parameters
            and req.parameters["triton_enable_empty_final_response"].bool_param
        )
        if raw_handle and self.kv is None:
            raise BadRequest("this worker relays no KV cache: send an empty kv_handle to recompute")
        handle = self.kv.parse_handle(raw_handle) if raw_handle and self.kv is not None else None
        stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else self.engine.scheduler.eos_token_ids
        )
        if params.max_tokens <= 1 or first in stop_ids:
            # Nothing left to generate: the prefill's first token already ended the request.
            if handle is not None and self.kv is not None:
                self.kv.drop(handle)
            reason = "stop" if first in stop_ids else "length"
            await emit(
                infer_response(req, {}, params={"triton_final_response": True, "finish_reason": reason})
            )
            return
        rid = uuid.uuid4().hex
        queue = self.channel.subscribe(rid)
        try:
            now = time.monotonic()
            if handle is not None and self.kv is not None:
                self.kv.expect(rid, handle)
            add = functools.partial(self.engine.add_decode_request, remote_kv=handle is not None)
            await self.channel.call(add, rid, input_ids, first, params, now)
            self._count_prompt(len(input_ids))
            first_output = True
            while True:
                item = await queue.get()
                if isinstance(item, WorkerGone):
                    raise item
                if isinstance(item, EngineFailed):
                    raise BadRequest(str(item))
                if first_output:
                    first_output = False
                    self._observe_queue(item)
                tokens = item.new_token_ids
                for i, token in enumerate(tokens):
                    last = item.finished and i == len(tokens) - 1 and not empty_final
                    params_out: dict[str, Any] = {"triton_final_response": last}
                    if last:
                        params_out["finish_reason"] = item.finish_reason or "stop"
                    arrays = token_logprob_outputs(params, item.logprobs[i] if item.logprobs else None)
                    await emit(infer_response(req, {"token_id": [token]}, params=params_out, arrays=arrays))
                if item.finished:
                    if empty_final:
                        await emit(
                            infer_response(
                                req,
                                {},
                                params={"triton_final_response": True, "finish_reason": item.finish_reason},
                            )
                        )
                    return
        except BaseException:
            if self.kv is not None:
                self.kv.forget(rid)
            self.channel.call_soon(self.engine.abort, rid)
            raise
        finally:
            self.channel.unsubscribe(rid)

    # ---- metrics -----------------------------------------------------------------------------------------
    def _count_prompt(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(n)

    def _observe_queue(self, out: RequestOutput) -> None:
        if self.metrics is not None and out.first_scheduled_time is not None:
            self.metrics.queue_seconds.observe(max(out.first_scheduled_time - out.arrival_time, 0.0))

    def _observe_first(self, out: RequestOutput) -> None:
        self._observe_queue(out)
        if self.metrics is not None and out.first_scheduled_time is not None:
            self.metrics.prefill_seconds.observe(max(time.monotonic() - out.first_scheduled_time, 0.0))
