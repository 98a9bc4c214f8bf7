"""A TP rank other than 0: its shard of the model and of the KV cache, run as rank 0 says.

The main thread replays each step's forward (its all-reduces pair with the other ranks'); the
link's thread pool serves KV calls on this rank's own transport (publish: lease the same blocks;
fetch: read this rank's heads); a lost link or a failed step ends the process non-zero. The pod's
first process on a non-leader pod also serves ``/ready`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from typing import Any

from kvrelay_worker.engine.paged_attention import allocate_kv_cache
from kvrelay_worker.engine.runner import ModelRunner
from kvrelay_worker.kv import KVHandle, KVLayout, KVMetrics, KVTransport, create_transport
from kvrelay_worker.model.loader import load_model
from kvrelay_worker.server.app import WorkerOptions, rank_kv_port
from kvrelay_worker.tp import group
from kvrelay_worker.tp.link import LeaderLink
from kvrelay_worker.tp.options import TPPlacement

log = logging.getLogger(__name__)

_STOP = object()


def run_follower(opts: WorkerOptions, placement: TPPlacement, rank: int, serve_http: bool) -> int:
    """Join the group, load this rank's shard, and run rank 0's steps until told to stop."""
    device = group.rank_device(opts.engine.device, placement, rank)
    tp = group.init_group(placement, rank, device)
    import torch

    dtype = getattr(torch, opts.engine.dtype) if opts.engine.dtype else None
    model = load_model(opts.model, device, dtype, opts.engine.max_model_len, tp)
    param = next(model.parameters())
    kv_cache = allocate_kv_cache(
        model.config, opts.engine.num_blocks, opts.engine.block_size, param.dtype, param.device,
        model.num_kv_heads_local,
    )  # fmt: skip
    runner = ModelRunner(model, kv_cache, opts.engine.block_size)
    link = LeaderLink(
        placement.leader_addr,
        placement.port + 1,
        group.authkey(placement, dict(os.environ)),
        group.JOIN_TIMEOUT_S,
    )
    init: dict[str, Any] = link.init
    transport = (
        _transport(opts, placement, rank, kv_cache, init) if init.get("kv_backend") != "none" else None
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="tp-kv", daemon=True).start()
    if transport is not None:
        transport.start()

    def handle_call(op: str, args: Any) -> Any:
        if transport is None:
            raise RuntimeError("this worker has no KV transport")
        if op == "publish":
            request_id, block_ids, num_tokens, handle_id = args
            handle = transport.publish(
                request_id,
                block_ids,
                num_tokens,
                lambda _ids: link.event("released", handle_id),
                handle_id=handle_id,
            )
            return handle.model_dump(mode="json")
        if op == "fetch":
            handle_json, dst, timeout_s, skip = args
            coro = transport.fetch(KVHandle.model_validate(handle_json), dst, timeout_s, skip)
            return asyncio.run_coroutine_threadsafe(coro, loop).result()  # bytes moved, for rank 0's metric
        raise ValueError(f"unknown TP call {op!r}")

    steps: queue.SimpleQueue[Any] = queue.SimpleQueue()
    http = None
    if serve_http and opts.metrics_port:
        from kvrelay_worker.server.metrics_http import start_http

        http = start_http(opts.host, opts.metrics_port, lambda: "serving")
    link.serve(
        on_step=steps.put,
        on_stop=lambda: steps.put(_STOP),
        handle_call=handle_call,
        on_lost=lambda why: group.exit_now(1, f"TP rank {rank} lost rank 0 ({why})"),
    )
    link.hello(rank, {"kv_endpoint": transport.endpoint if transport is not None else None})
    log.info("TP rank %d of %d ready (%s)", rank, placement.size, device)
    try:
        while (step := steps.get()) is not _STOP:
            runner.replay(step)
    except BaseException as exc:  # a failed forward leaves the group out of step: the worker must go
        group.exit_now(1, f"TP rank {rank} step failed: {exc!r}")
    if transport is not None:
        transport.close()
    if http is not None:
        http.shutdown()
    return 0


def _transport(
    opts: WorkerOptions, placement: TPPlacement, rank: int, kv_cache: Any, init: dict[str, Any]
) -> KVTransport:
    layout = KVLayout.model_validate(init["kv_layout"])
    return create_transport(
        init["kv_backend"],
        kv_cache,
        layout,
        rank,
        host=opts.kv_host,
        port=rank_kv_port(opts.kv_port, placement.local_index(rank)),
        advertise_host=opts.kv_advertise_host,
        secret=bytes.fromhex(init["kv_secret"]),
        lease_s=opts.kv_lease_s,
        metrics=KVMetrics(opts.served_model_name, opts.role),
    )


__all__ = ["run_follower"]
