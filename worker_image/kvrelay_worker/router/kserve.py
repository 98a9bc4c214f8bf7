"""Client side of the workers' KServe v2 contract (docs/wire-contracts.md section 3), via tritonclient aio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from kvrelay_worker.kserve_models import DECODE_MODEL, PREFILL_MODEL
from kvrelay_worker.router.errors import WorkerFailed
from kvrelay_worker.router.logprobs import TokenLogprob

_DOWN_CODES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
# A server-side CANCELLED is a worker stopping (our own cancellation raises CancelledError instead).
_DOWN_GRPC = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# What grpc aio reports when the call broke under an operation of the client's (a worker ending a
# bidirectional stream while the client side is still open): the server's own status is lost. A
# worker's own INTERNAL carries its message instead. Seen when a draining decode worker ended streams.
_CORE_LOST_STATUS = "Internal error from Core"


# gRPC's reconnect backoff grows to 120 s by default: a worker restarted on the same address (kvrelay
# serve, a pod that keeps its IP) can sit unused that long after it is ready (a probe saw 25 s after a
# 47 s outage). Two seconds bounds it; the other options are tritonclient's defaults, which
# `channel_args` replaces whole.
_MAX_RECONNECT_BACKOFF_MS = 2000
_MAX_MESSAGE_BYTES = 2**31 - 1


def channel_args() -> list[tuple[str, int]]:
    """The options of every channel to a worker: tritonclient's, with reconnect backoff capped."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
    ]


def _draining(message: str) -> bool:
    """A draining worker refuses new work and ends late streams with messages starting `draining`."""
    return "draining" in message.lower()


def _from_triton(exc: InferenceServerException, what: str) -> WorkerFailed:
    status, message = str(exc.status() or ""), exc.message() or ""
    down = status in _DOWN_CODES or _draining(message)
    return WorkerFailed(f"{what}: {message}", down, "draining" if _draining(message) else None)


def _from_grpc(exc: grpc.aio.AioRpcError, what: str) -> WorkerFailed:
    details = exc.details() or ""
    lost = exc.code() == grpc.StatusCode.INTERNAL and details == _CORE_LOST_STATUS
    down = exc.code() in _DOWN_GRPC or lost or _draining(details)
    reason = "draining" if _draining(details) else None
    return WorkerFailed(f"{what}: {exc.code().name} {details}", down, reason)


def in_band_failure(address: str, message: str) -> WorkerFailed:
    """An error response inside a decode stream: a request error unless the worker is draining."""
    draining = _draining(message)
    return WorkerFailed(f"decode on {address}: {message}", draining, "draining" if draining else None)


def _int64(name: str, values: list[int]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(values)], "INT64")
    tensor.set_data_from_numpy(np.asarray(values, dtype=np.int64))
    return tensor


def _bytes(name: str, value: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
    return tensor


def _scalar_bytes(result: Any, name: str) -> bytes:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return b""
    value = array.reshape(-1)[0]
    return value if isinstance(value, bytes) else str(value).encode()


def _logprobs(result: Any, token_ids: Sequence[int], names: tuple[str, str, str]) -> list[TokenLogprob]:
    """Per-token logprobs from the outputs `names` (logprob [n], top ids [n, k], top logprobs [n, k]).

    Raises ValueError when they are missing or their shapes do not fit `token_ids`.
    """
    logprob, top_ids, top_logprobs = (result.as_numpy(name) for name in names)
    n = len(token_ids)
    if n == 0:
        return []  # a one-token prompt: nothing before its first token to predict it from
    if logprob is None or top_ids is None or top_logprobs is None:
        raise ValueError(f"reply lacks {', '.join(names)} (asked for logprobs)")
    logprob = logprob.reshape(-1)
    if logprob.size != n or top_ids.shape != top_logprobs.shape or top_ids.size % n:
        raise ValueError(f"{names[0]} has {logprob.size} values for {n} tokens, top shapes {top_ids.shape}")
    top_ids, top_logprobs = top_ids.reshape(n, -1).tolist(), top_logprobs.reshape(n, -1).tolist()
    return [
        TokenLogprob(int(t), float(lp), tuple(zip(map(int, ids), map(float, lps), strict=True)))
        for t, lp, ids, lps in zip(token_ids, logprob.tolist(), top_ids, top_logprobs, strict=True)
    ]


TOKEN_LOGPROB_OUTPUTS = ("logprob", "top_token_ids", "top_logprobs")
PROMPT_LOGPROB_OUTPUTS = ("prompt_logprobs", "prompt_top_token_ids", "prompt_top_logprobs")

__all__ = ["DecodeToken", "PrefillResult", "TokenLogprob", "WorkerClient", "WorkerFailed", "in_band_failure"]


@dataclass(frozen=True)
class PrefillResult:
    token_id: int
    kv_handle: bytes  # JSON KVHandle; empty when finished at the first token
    finish_reason: str  # "" while unfinished
    logprobs: TokenLogprob | None = None  # the first token's, when the sampling JSON asked `logprobs`
    # input_ids[1:] given their prefix, when it asked `prompt_logprobs`
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class DecodeToken:
    token_id: int | None  # None on an empty final response
    finish_reason: str | None  # set on the final response
    logprobs: TokenLogprob | None = None  # when the sampling JSON asked `logprobs`


class WorkerClient:
    """One gRPC channel to one worker, shared by all requests routed to it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = grpcaio.InferenceServerClient(address, channel_args=channel_args())

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except (InferenceServerException, grpc.aio.AioRpcError, OSError):
            return False

    async def prefill(self, request_id: str, input_ids: list[int], sampling: dict[str, Any]) -> PrefillResult:
        inputs = [_int64("input_ids", input_ids), _bytes("sampling", json.dumps(sampling).encode())]
        try:
            result = await self._client.infer(PREFILL_MODEL, inputs, request_id=request_id)
        except InferenceServerException as exc:
            raise _from_triton(exc, f"prefill on {self.address}") from None
        except grpc.aio.AioRpcError as exc:
            raise _from_grpc(exc, f"prefill on {self.address}") from None
        token = result.as_numpy("token_id")
        if token is None or token.size != 1:
            raise WorkerFailed(f"prefill on {self.address}: reply has no token_id", worker_down=False)
        token_id = int(token.reshape(-1)[0])
        try:
            first = _logprobs(result, [token_id], TOKEN_LOGPROB_OUTPUTS) if "logprobs" in sampling else None
            prompt = None
            if "prompt_logprobs" in sampling:
                prompt = tuple(_logprobs(result, input_ids[1:], PROMPT_LOGPROB_OUTPUTS))
        except ValueError as exc:
            raise WorkerFailed(f"prefill on {self.address}: {exc}", worker_down=False) from None
        return PrefillResult(
            token_id=token_id,
            kv_handle=_scalar_bytes(result, "kv_handle"),
            finish_reason=_scalar_bytes(result, "finish_reason").decode(),
            logprobs=first[0] if first else None,
            prompt_logprobs=prompt,
        )

    async def decode(
        self,
        request_id: str,
        input_ids: list[int],
        first_token: int,
        kv_handle: bytes,
        sampling: dict[str, Any],
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[DecodeToken]:
        """Stream the tokens after `first_token`; closing the iterator cancels the call on the worker.

        `idle_timeout_s` bounds the wait for each response: a worker that is alive but stuck ends the
        request with an error instead of a hang (a killed worker is noticed at once anyway).
        """
        done = asyncio.Event()
        request = {
            "model_name": DECODE_MODEL,
            "request_id": request_id,
            "inputs": [
                _int64("input_ids", input_ids),
                _int64("first_token", [first_token]),
                _bytes("kv_handle", kv_handle),
                _bytes("sampling", json.dumps(sampling).encode()),
            ],
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request
            # Keep our half of the stream open until the answer is complete: a half-close could be
            # read by a worker as "client gone".
            await done.wait()

        responses = self._client.stream_infer(requests())
        with_logprobs = "logprobs" in sampling
        try:
            while True:
                try:
                    # A timer per response, no task: wait_for would cost a task per token.
                    async with asyncio.timeout(idle_timeout_s):
                        result, error = await anext(responses)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise WorkerFailed(
                        f"decode on {self.address}: no token for {idle_timeout_s:g} s", False, "stalled"
                    ) from None
                if error is not None:
                    raise in_band_failure(self.address, error.message() or "")
                params = result.get_response().parameters
                final = "triton_final_response" in params and params["triton_final_response"].bool_param
                token = result.as_numpy("token_id")
                token_id = int(token.reshape(-1)[0]) if token is not None and token.size else None
                finish = params["finish_reason"].string_param if "finish_reason" in params else None
                logprobs = None
                if with_logprobs and token_id is not None:
                    try:
                        (logprobs,) = _logprobs(result, [token_id], TOKEN_LOGPROB_OUTPUTS)
                    except ValueError as exc:
                        raise WorkerFailed(f"decode on {self.address}: {exc}", False) from None
                yield DecodeToken(token_id, (finish or "stop") if final else None, logprobs)
                if final:
                    return
            raise WorkerFailed(f"decode on {self.address}: stream ended without a final response", True)
        except grpc.aio.AioRpcError as exc:
            raise _from_grpc(exc, f"decode on {self.address}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our request is being cancelled (the client went away)
            # Nobody cancelled us: grpc.aio cancels the calls of a channel closed under them.
            raise WorkerFailed(f"decode on {self.address}: channel closed under the stream", True) from None
        finally:
            done.set()
            responses.cancel()
