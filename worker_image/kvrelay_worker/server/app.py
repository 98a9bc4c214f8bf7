"""Assemble and run one worker process: engine thread, KV transport, gRPC server, /metrics and /ready.

On SIGTERM (or ``stop``) the worker drains (``server/drain.py``) and returns; a second signal cuts
the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any, Literal

import grpc
from pydantic import BaseModel, Field, model_validator
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from kvrelay_worker.engine import Engine, EngineConfig
from kvrelay_worker.kv import KVLayout, KVMetrics, KVTransport, create_transport
from kvrelay_worker.metrics import WorkerMetrics
from kvrelay_worker.server.drain import (
    DEADLINE_MESSAGE,
    DEFAULT_DRAIN_SECONDS,
    DRAINING_MESSAGE,
    DrainState,
    Outcome,
    Remaining,
)
from kvrelay_worker.server.engine_loop import EngineChannel, EngineLoop, WorkerGone
from kvrelay_worker.server.kv_bridge import KVBridge
from kvrelay_worker.server.metrics_http import start_http
from kvrelay_worker.server.servicer import WorkerServicer
from kvrelay_worker.tp.options import TPPlacement

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # how often a drain looks at what is left: cheap, and keeps the exit prompt
DRAIN_LOG_EVERY_S = 10.0
STOP_GRACE_S = 2.0  # for the last responses to flush once the drain has ended every stream


class WorkerOptions(BaseModel):
    """Everything a worker process needs; built from the command line (contract section 5)."""

    role: Literal["prefill", "decode", "colocated"]
    model: Path
    served_model_name: str = Field(
        description="the model's name in the KV layout and metrics; default: the model directory's name"
    )
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = Field(8002, description="0 disables /metrics")
    kv_backend: Literal["nixl", "tcp", "none"] = "nixl"
    kv_host: str = "127.0.0.1"
    kv_advertise_host: str | None = None
    kv_port: int = 0
    kv_failure_policy: Literal["recompute", "fail"] = "recompute"
    kv_lease_s: float = 30.0
    kv_fetch_timeout_s: float = 30.0
    drain_seconds: float = Field(
        DEFAULT_DRAIN_SECONDS, ge=0, description="on SIGTERM, how long to finish running work and held KV"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tp: TPPlacement | None = Field(None, description="tensor parallelism over several rank processes")

    @model_validator(mode="before")
    @classmethod
    def _default_served_model_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("served_model_name") and data.get("model") is not None:
            data = {**data, "served_model_name": Path(data["model"]).resolve().name}
        return data


def kv_layout(opts: WorkerOptions, engine: Engine) -> KVLayout:
    """The worker's KV layout: the whole model's heads, split over its TP degree."""
    cfg = engine.model.config
    return KVLayout(
        model_id=opts.served_model_name,
        num_layers=cfg.num_hidden_layers,
        block_size=engine.config.block_size,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        dtype=str(engine.dtype).removeprefix("torch."),
        tp_size=opts.tp.size if opts.tp is not None else 1,
    )


def rank_kv_port(port: int, local_index: int) -> int:
    """The KV control port of a pod's ``local_index``-th rank: ``port`` + index (0: any free port)."""
    return port + local_index if port else 0


def make_transport(opts: WorkerOptions, engine: Engine) -> KVTransport | None:
    """The KV relay endpoint over the engine's cache (rank 0's shard), or None with ``--kv-backend none``."""
    if opts.kv_backend == "none":
        return None
    return create_transport(
        opts.kv_backend,
        engine.kv_cache,
        kv_layout(opts, engine),
        host=opts.kv_host,
        port=opts.kv_port,
        advertise_host=opts.kv_advertise_host,
        lease_s=opts.kv_lease_s,
        metrics=KVMetrics(opts.served_model_name, opts.role),
    )


async def drain(servicer: WorkerServicer, transport: KVTransport | None, state: DrainState) -> Outcome:
    """Admit nothing, wait for running requests and held KV leases, end what is left at the deadline."""
    servicer.draining = True

    def remaining() -> Remaining:
        return Remaining(servicer.active, len(transport.leases) if transport is not None else 0)

    now = time.monotonic()
    if not state.draining:  # stopped through ``stop``, not by a signal
        state.signal(now)
    log.info("drain started: %s; deadline in %.1f s", remaining(), max(state.deadline - now, 0.0))
    next_log = now + DRAIN_LOG_EVERY_S
    while (outcome := state.outcome(now, remaining())) is None:
        if now >= next_log:
            log.info("draining: %s, %.0f s left", remaining(), state.deadline - now)
            next_log = now + DRAIN_LOG_EVERY_S
        await asyncio.sleep(DRAIN_POLL_S)
        now = time.monotonic()
    elapsed = state.elapsed(now)
    if outcome is Outcome.DRAINED:
        log.info("drain finished in %.1f s: every request done, every KV lease released", elapsed)
        servicer.end_streams(DRAINING_MESSAGE, cut_off=False)  # idle streams
    else:
        log.warning("drain %s after %.1f s: ending %s", outcome.value, elapsed, remaining())
        servicer.end_streams(DEADLINE_MESSAGE, cut_off=True)
    return outcome


async def serve(opts: WorkerOptions, engine: Engine | None = None, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and return; prints ``READY ...`` once
    serving."""
    loop = asyncio.get_running_loop()
    channel = EngineChannel()
    servicers: list[WorkerServicer] = []

    def end_as_lost(message: str) -> None:
        """Any thread: end every request as a dead worker's would end (UNAVAILABLE: the router resumes it)."""

        def end() -> None:
            if servicers:
                servicers[0].ready = False
                servicers[0].end_streams(message, cut_off=True)
            else:
                channel.fail_all(message, WorkerGone)

        loop.call_soon_threadsafe(end)

    ranks = None
    if opts.tp is not None and opts.tp.size > 1:
        from kvrelay_worker.tp.rank0 import start_rank0

        ranks = start_rank0(opts, end_as_lost)
        engine = ranks.engine
    engine = engine or Engine.from_dir(opts.model, opts.engine)
    metrics = WorkerMetrics(opts.served_model_name, opts.role)
    transport = make_transport(opts, engine) if ranks is None else ranks.transport
    kv = KVBridge(
        engine,
        channel,
        transport,
        role=opts.role,
        failure_policy=opts.kv_failure_policy,
        fetch_timeout_s=opts.kv_fetch_timeout_s,
    )
    engine_loop = EngineLoop(
        engine,
        loop,
        metrics,
        on_kv_target=kv.on_kv_target,
        channel=channel,
        on_error=ranks.engine_failed if ranks is not None else None,
    )
    http = None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    stop = stop or asyncio.Event()
    state = DrainState(opts.drain_seconds)

    def on_signal(sig: signal.Signals) -> None:
        if state.signal(time.monotonic()):
            log.info("%s: draining (up to %g s)", sig.name, opts.drain_seconds)
        else:
            log.warning("%s during the drain: cutting it short", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):  # before READY: a stop right after it must be graceful
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(sig, on_signal, sig)
    try:
        if transport is not None:
            transport.start()
        if ranks is not None:
            ranks.join()  # every rank loaded, its transport started: only now is the worker whole
        servicer = WorkerServicer(opts.role, engine_loop, kv, metrics)
        servicers.append(servicer)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{opts.host}:{opts.grpc_port}")
        if opts.metrics_port:
            http = start_http(opts.host, opts.metrics_port, lambda: servicer.readiness)
        engine_loop.start()
        await server.start()
        servicer.ready = True
        kv = f" kv={transport.endpoint}" if transport is not None else ""
        print(f"READY role={opts.role} grpc={opts.host}:{port} metrics={opts.metrics_port}{kv}", flush=True)
        await stop.wait()
        await drain(servicer, transport, state)
        await server.stop(grace=STOP_GRACE_S)
    finally:
        if ranks is not None:
            ranks.stop()
        engine_loop.stop()
        if transport is not None:
            transport.close()
        if http is not None:
            http.shutdown()
            http.server_close()
        log.info("worker stopped")
