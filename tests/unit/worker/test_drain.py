"""The worker's drain without processes: the state machine, the drain loop, admission, /ready."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from kvrelay_worker.ports import free_ports
from kvrelay_worker.server.app import drain
from kvrelay_worker.server.drain import (
    DEADLINE_MESSAGE,
    DRAINING_MESSAGE,
    DrainState,
    Outcome,
    Remaining,
)
from kvrelay_worker.server.engine_loop import EngineChannel, WorkerGone
from kvrelay_worker.server.metrics_http import make_app, start_http
from kvrelay_worker.server.servicer import WorkerServicer
from prometheus_client import CollectorRegistry, Counter
from tritonclient.grpc import service_pb2 as pb

NOTHING, BUSY = Remaining(0, 0), Remaining(2, 1)


def test_drain_state_serving_then_draining_until_empty_or_deadline() -> None:
    state = DrainState(10)
    assert not state.draining and state.deadline is None
    assert state.outcome(100.0, BUSY) is None  # serving: no drain yet
    assert state.signal(100.0) is True
    assert state.draining and state.deadline == 110.0
    assert state.outcome(105.0, BUSY) is None
    assert state.outcome(105.0, Remaining(0, 1)) is None  # a held lease keeps it going
    assert state.outcome(105.0, NOTHING) is Outcome.DRAINED
    assert state.outcome(110.0, BUSY) is Outcome.DEADLINE
    assert state.outcome(110.0, NOTHING) is Outcome.DRAINED  # nothing to end: a clean drain
    assert state.elapsed(107.5) == 7.5


def test_a_second_signal_cuts_the_drain_short() -> None:
    state = DrainState(10)
    assert state.signal(0.0) is True
    assert state.signal(1.0) is False  # the deadline stays where the first signal put it
    assert state.deadline == 10.0
    assert state.outcome(1.0, BUSY) is Outcome.CUT_SHORT
    assert state.outcome(1.0, NOTHING) is Outcome.DRAINED
    with pytest.raises(ValueError, match="drain_seconds"):
        DrainState(-1)


def test_remaining_says_what_is_left() -> None:
    assert str(BUSY) == "2 request(s) running, 1 KV lease(s) held"
    assert NOTHING.empty and not Remaining(0, 1).empty


# ---- the servicer's admission and the drain loop --------------------------------------------------


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class _Context:
    """grpc.aio ServicerContext stand-in: abort raises, as the real one does."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


def _servicer(role: str = "prefill", healthy: bool = True) -> WorkerServicer:
    engine_loop = SimpleNamespace(engine=SimpleNamespace(), channel=EngineChannel(), healthy=healthy)
    return WorkerServicer(role, engine_loop)  # type: ignore[arg-type]


def test_readiness_follows_load_drain_and_engine_health() -> None:
    servicer = _servicer()
    assert servicer.readiness == "not loaded"
    servicer.ready = True
    assert servicer.readiness == "serving"
    servicer.draining = True
    assert servicer.readiness == "draining"
    assert _servicer(healthy=False).readiness == "engine failed"


async def test_draining_servicer_refuses_with_unavailable_and_reports_not_ready() -> None:
    servicer = _servicer()
    servicer.ready = servicer.draining = True
    request = pb.ModelInferRequest(model_name="kvrelay_prefill", id="r")
    with pytest.raises(_Aborted) as refused:
        await servicer.ModelInfer(request, _Context())
    assert (refused.value.code, refused.value.details) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
    # A stream opened during the drain stays open and refuses its request in-band (a status ending the
    # call while the client writes can be lost on the client).
    stream = servicer.ModelStreamInfer(
        _one_request(pb.ModelInferRequest(model_name="kvrelay_prefill", id="s")), _Context()
    )
    refusal = await anext(stream)
    assert (refusal.error_message, refusal.infer_response.id) == (DRAINING_MESSAGE, "s")
    await stream.aclose()
    assert not (await servicer.ServerReady(pb.ServerReadyRequest(), None)).ready
    assert not (await servicer.ModelReady(pb.ModelReadyRequest(name="kvrelay_prefill"), None)).ready
    assert (await servicer.ServerLive(pb.ServerLiveRequest(), None)).live
    assert servicer.active == 0


async def _one_request(request: pb.ModelInferRequest):
    yield request
    await asyncio.Event().wait()  # the client keeps its half open, as the router does


async def test_end_streams_ends_open_streams_and_at_the_deadline_the_requests() -> None:
    servicer = _servicer()
    out: asyncio.Queue = asyncio.Queue(maxsize=2)
    servicer._streams.add(out)
    queued = object()
    out.put_nowait(queued)
    waiting = servicer.channel.subscribe("r1")
    servicer.end_streams(DRAINING_MESSAGE, cut_off=False)
    assert out.get_nowait() is queued  # what was queued goes out first
    assert out.get_nowait().message == DRAINING_MESSAGE
    assert waiting.empty()  # a clean end touches no request
    out.put_nowait(queued)
    out.put_nowait(queued)  # a full queue: the reader lags
    servicer.end_streams(DEADLINE_MESSAGE, cut_off=True)
    assert out.qsize() == 1 and out.get_nowait().message == DEADLINE_MESSAGE
    gone = waiting.get_nowait()
    assert isinstance(gone, WorkerGone) and str(gone) == DEADLINE_MESSAGE


class _FakeServicer:
    def __init__(self, active: int) -> None:
        self.active, self.draining = active, False
        self.ended: list[tuple[str, bool]] = []

    def end_streams(self, message: str, cut_off: bool) -> None:
        self.ended.append((message, cut_off))


async def test_drain_waits_for_requests_and_leases_then_ends_cleanly() -> None:
    servicer, leases = _FakeServicer(active=2), [object()]
    transport = SimpleNamespace(leases=leases)

    async def finish_work() -> None:
        await asyncio.sleep(0.1)
        servicer.active = 0
        await asyncio.sleep(0.1)
        leases.clear()  # the reader claimed the KV

    worker = asyncio.create_task(finish_work())
    outcome = await drain(servicer, transport, DrainState(30))  # type: ignore[arg-type]
    await worker
    assert outcome is Outcome.DRAINED and servicer.draining
    assert servicer.ended == [(DRAINING_MESSAGE, False)]


@pytest.mark.parametrize(("signals", "outcome"), [(0, Outcome.DEADLINE), (2, Outcome.CUT_SHORT)])
async def test_drain_ends_what_outlives_it_with_deadline_passed(signals: int, outcome: Outcome) -> None:
    servicer = _FakeServicer(active=1)
    state = DrainState(0.2 if signals == 0 else 30)
    for _ in range(signals):
        state.signal(time.monotonic())
    assert await drain(servicer, None, state) is outcome  # type: ignore[arg-type]
    assert servicer.ended == [(DEADLINE_MESSAGE, True)]


# ---- /ready and /metrics ----------------------------------------------------------------------------


def _call(app: Any, path: str) -> tuple[str, bytes]:
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list) -> None:
        seen["status"] = status

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}, start_response))
    return seen["status"], body


def test_ready_is_200_only_while_serving_and_metrics_keep_answering() -> None:
    registry = CollectorRegistry()
    Counter("kvrelay_probe_test", "x", registry=registry).inc()
    state = {"now": "serving"}
    app = make_app(lambda: state["now"], registry)
    assert _call(app, "/ready") == ("200 OK", b"serving\n")
    for reason in ("draining", "not loaded", "engine failed"):
        state["now"] = reason
        assert _call(app, "/ready") == ("503 Service Unavailable", f"{reason}\n".encode())
        status, body = _call(app, "/metrics")  # liveness: still answers while draining
        assert status.startswith("200") and b"kvrelay_probe_test_total 1.0" in body


def test_http_server_serves_ready_over_a_socket() -> None:
    (port,) = free_ports(1)
    state = {"now": "serving"}
    httpd = start_http("127.0.0.1", port, lambda: state["now"])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as resp:
            assert resp.status == 200
        state["now"] = "draining"
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert answer.value.code == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200 and b"# HELP" in resp.read()
    finally:
        httpd.shutdown()
        httpd.server_close()
