"""KServe v2 (Triton) gRPC servicer for the prefill, decode and colocated roles (contract section 3)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import grpc
import torch
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from kvrelay_worker.engine import Engine, KVTarget, RequestOutput, RequestRefused, SamplingParams
from kvrelay_worker.metrics import WorkerMetrics
from kvrelay_worker.server.codec import BadRequest, infer_response, read_inputs, require, stream_error
from kvrelay_worker.server.engine_loop import EngineFailed, EngineLoop

log = logging.getLogger(__name__)

PREFILL_MODEL = "kvrelay_prefill"
DECODE_MODEL = "kvrelay_decode"
Role = Literal["prefill", "decode", "colocated"]
FailurePolicy = Literal["recompute", "fail"]
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
_OUTPUTS = {
    PREFILL_MODEL: [("token_id", "INT64", [1]), ("kv_handle", "BYTES", [1]), ("finish_reason", "BYTES", [1])],
    DECODE_MODEL: [("token_id", "INT64", [1])],
}


def models_for_role(role: Role) -> list[str]:
    return {"prefill": [PREFILL_MODEL], "decode": [DECODE_MODEL], "colocated": [PREFILL_MODEL, DECODE_MODEL]}[
        role
    ]


def parse_sampling(raw: list[bytes]) -> SamplingParams:
    try:
        return SamplingParams.model_validate_json(raw[0] or b"{}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'sampling'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"invalid sampling JSON: {problems}") from None


class WorkerServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        role: Role,
        engine_loop: EngineLoop,
        transport: Any = None,
        metrics: WorkerMetrics | None = None,
        failure_policy: FailurePolicy = "recompute",
        fetch_timeout_s: float = 30.0,
    ) -> None:
        self.role = role
        self.models = models_for_role(role)
        self.loop_ = engine_loop
        self.engine: Engine = engine_loop.engine
        self.transport = transport
        self.metrics = metrics
        self.failure_policy = failure_policy
        self.fetch_timeout_s = fetch_timeout_s
        self.ready = False
        self._pending_fetch: dict[str, Any] = {}  # request id -> KVHandle awaiting its KVTarget
        self._tasks: set[asyncio.Task] = set()
        engine_loop.on_kv_target = self._on_kv_target

    # ---- health and metadata -----------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready and self.loop_.healthy)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=f"kvrelay-worker-{self.role}", version="0.1.0", extensions=[])

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.ready and self.loop_.healthy and request.name in self.models)

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
        if name not in self.models:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} not served by this {self.role} worker ({self.models})",
            )
        return name

    # ---- inference ----------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        if request.model_name == DECODE_MODEL and DECODE_MODEL in self.models:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "ModelInfer RPC doesn't support models with decoupled transaction policy; "
                "use ModelStreamInfer",
            )
        await self._model_or_abort(request.model_name, context)
        try:
            return await self._prefill(request)
        except (BadRequest, RequestRefused) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def ModelStreamInfer(self, request_iterator, context):
        """Many requests per stream; one writer (this generator) drains a bounded queue."""
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(maxsize=STREAM_QUEUE_SIZE)
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                if req.model_name not in self.models:
                    raise BadRequest(f"model {req.model_name!r} not served by this {self.role} worker")
                if req.model_name == PREFILL_MODEL:
                    resp = await self._prefill(req)
                    resp.parameters["triton_final_response"].bool_param = True
                    await out.put(pb.ModelStreamInferResponse(infer_response=resp))
                else:
                    await self._decode(req, lambda r: out.put(pb.ModelStreamInferResponse(infer_response=r)))
            except (BadRequest, RequestRefused) as exc:
                await out.put(stream_error(req.id, req.model_name, str(exc)))
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
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reader_task.cancel()
            for task in list(tasks):
                task.cancel()  # the client went away: abort its requests in the engine
            await asyncio.gather(reader_task, *tasks, return_exceptions=True)

    # ---- prefill ---------------------------------------------------------------------------------------
    async def _prefill(self, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
        inputs = read_inputs(req)
        input_ids = require(inputs, "input_ids", "INT64").tolist()
        params = parse_sampling(require(inputs, "sampling", "BYTES", 1))
        rid = uuid.uuid4().hex
        queue = self.loop_.subscribe(rid)
        try:
            await self.loop_.call(self.engine.add_request, rid, input_ids, params, time.monotonic(), True)
            self._count_prompt(len(input_ids))
            out = await queue.get()
            if isinstance(out, EngineFailed):
                raise BadRequest(str(out))
        except asyncio.CancelledError:
            self.loop_.call_soon(self._abort_or_release, rid)
            raise
        finally:
            self.loop_.unsubscribe(rid)
        self._observe_first(out)
        token = out.new_token_ids[0]
        if out.finished:
            return infer_response(
                req,
                {"token_id": [token]},
                {"kv_handle": [b""], "finish_reason": [out.finish_reason.encode()]},
            )
        try:
            handle = self.transport.publish(
                rid,
                out.kv_block_ids,
                out.num_prompt_tokens,
                on_release=lambda _ids, rid=rid: self.loop_.call_soon(self.engine.release, rid),
            )
        except Exception:
            self.loop_.call_soon(self.engine.release, rid)
            raise
        return infer_response(
            req, {"token_id": [token]}, {"kv_handle": [handle.to_json()], "finish_reason": [b""]}
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
        empty_final = (
            "triton_enable_empty_final_response" in req.parameters
            and req.parameters["triton_enable_empty_final_response"].bool_param
        )
        handle = self._parse_handle(raw_handle) if raw_handle else None
        stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else self.engine.scheduler.eos_token_ids
        )
        if params.max_tokens <= 1 or first in stop_ids:
            # Nothing left to generate: the prefill's first token already ended the request.
            if handle is not None and self.transport is not None:
                self.loop_.call_soon(self._drop_local_lease, handle)
            reason = "stop" if first in stop_ids else "length"
            await emit(
                infer_response(req, {}, params={"triton_final_response": True, "finish_reason": reason})
            )
            return
        rid = uuid.uuid4().hex
        queue = self.loop_.subscribe(rid)
        try:
            now = time.monotonic()
            if handle is not None:
                self._pending_fetch[rid] = handle
            add = functools.partial(self.engine.add_decode_request, remote_kv=handle is not None)
            await self.loop_.call(add, rid, input_ids, first, params, now)
            self._count_prompt(len(input_ids))
            first_output = True
            while True:
                item = await queue.get()
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
                    await emit(infer_response(req, {"token_id": [token]}, params=params_out))
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
            self._pending_fetch.pop(rid, None)
            self.loop_.call_soon(self.engine.abort, rid)
            raise
        finally:
            self.loop_.unsubscribe(rid)

    def _parse_handle(self, raw: bytes) -> Any:
        from kvrelay_worker.kv import KVHandle

        try:
            return KVHandle.from_json(raw)
        except ValidationError as exc:
            raise BadRequest(f"kv_handle is not a valid KVHandle JSON: {exc.errors()[0]['msg']}") from None

    def _on_kv_target(self, target: KVTarget) -> None:
        """The engine allocated blocks for a remote-KV request: fetch into them (event-loop thread)."""
        handle = self._pending_fetch.pop(target.request_id, None)
        if handle is None:
            self.loop_.call_soon(self.engine.remote_kv_done, target.request_id, False)
            return
        if self.role == "colocated" and handle.holder.agent_name == getattr(
            self.transport, "agent_name", None
        ):
            self.loop_.call_soon(self._local_handoff, handle, target)
            return
        task = asyncio.create_task(self._fetch(handle, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, handle: Any, target: KVTarget) -> None:
        from kvrelay_worker.kv import KVTransferError

        ok = False
        try:
            if self.transport is None:
                raise KVTransferError("no_transport", "this worker has no KV transport")
            if handle.num_tokens != target.num_tokens:
                raise KVTransferError(
                    "bad_handle", f"handle holds {handle.num_tokens} tokens, prompt has {target.num_tokens}"
                )
            await self.transport.fetch(handle, target.block_ids, self.fetch_timeout_s)
            ok = True
        except KVTransferError as exc:
            log.warning("KV fetch for %s failed (%s), policy %s", target.request_id, exc, self.failure_policy)
            if self.failure_policy == "fail":
                self.loop_.fail(target.request_id, f"KV transfer failed: {exc}")
                self.loop_.call_soon(self.engine.abort, target.request_id)
                return
        self.loop_.call_soon(self.engine.remote_kv_done, target.request_id, ok)

    def _local_handoff(self, handle: Any, target: KVTarget) -> None:
        """Colocated role (engine thread): copy the held blocks locally instead of transferring them."""
        leases = self.transport.leases
        ok = False
        with contextlib.suppress(Exception):
            lease = leases.claim(handle.handle_id, 0, 1, time.time(), time.time() + 30)
            src = torch.tensor(lease.block_ids, device=self.engine.kv_cache.device)
            dst = torch.tensor(target.block_ids, device=self.engine.kv_cache.device)
            if len(src) == len(dst):
                self.engine.kv_cache[:, :, dst] = self.engine.kv_cache[:, :, src]
                ok = True
            leases.reader_done(handle.handle_id, 0)
        self.engine.remote_kv_done(target.request_id, ok)

    def _drop_local_lease(self, handle: Any) -> None:
        if self.role == "colocated" and handle.handle_id in self.transport.leases:
            self.transport.leases.reader_done(handle.handle_id, 0)

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


def sampling_json(**kwargs: Any) -> bytes:
    return json.dumps(kwargs).encode()
