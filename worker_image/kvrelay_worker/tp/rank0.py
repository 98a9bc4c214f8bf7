"""Rank 0 of a TP worker: its shard, the link to the other ranks, the ranked KV relay.

``serve`` builds this instead of a plain engine when ``--tensor-parallel`` exceeds 1; the engine
then sends every step to the other ranks before running its own shard of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from kvrelay_worker.engine import Engine
from kvrelay_worker.server.app import WorkerOptions, kv_layout, make_transport
from kvrelay_worker.tp import group
from kvrelay_worker.tp.link import FollowerLinks
from kvrelay_worker.tp.ranked_transport import RankedTransport

log = logging.getLogger(__name__)


class Rank0:
    """What ``serve`` needs from rank 0: the engine, the transport, and the group's lifecycle."""

    def __init__(self, opts: WorkerOptions, end_requests: Callable[[str], None]) -> None:
        placement = opts.tp
        assert placement is not None
        self.placement = placement
        self._end_requests = end_requests  # ends every open request as a lost worker's (any thread)
        self._stopping = False
        device = group.rank_device(opts.engine.device, placement, 0)
        tp = group.init_group(placement, 0, device)
        self.engine = Engine.from_dir(opts.model, opts.engine.model_copy(update={"device": device}), tp)
        self._local = make_transport(opts, self.engine)
        self.links = FollowerLinks(
            opts.host,
            placement.port + 1,
            group.authkey(placement, dict(os.environ)),
            list(range(1, placement.size)),
            on_lost=self._lost,
            on_event=self._event,
        )
        self.transport = RankedTransport(self._local, self.links) if self._local is not None else None
        self._init: dict[str, Any] = {"kv_backend": opts.kv_backend}
        if self._local is not None:
            self._init |= {
                "kv_layout": kv_layout(opts, self.engine).model_dump(mode="json"),
                "kv_secret": self._local._secret.hex(),
            }

    def join(self) -> None:
        """Wait for every other rank; from now on each step goes to them first."""
        self.links.accept(self._init, group.JOIN_TIMEOUT_S)
        self.engine.runner.step_sink = self.links.send_step
        log.info("all %d TP ranks joined", self.placement.size)

    def stop(self) -> None:
        self._stopping = True
        self.links.stop()

    def engine_failed(self, exc: BaseException) -> None:
        """The engine thread died (e.g. an all-reduce whose peer is gone): a TP worker cannot go on."""
        message = f"TP rank 0's engine failed ({exc!r})"
        group.exit_now(1, message, before=lambda: self._end_requests(message))

    def _lost(self, rank: int, why: str) -> None:
        if self._stopping:
            return
        message = f"TP rank {rank} of this worker was lost ({why})"
        group.exit_now(1, message, before=lambda: self._end_requests(message))

    def _event(self, rank: int, kind: str, value: Any) -> None:
        if self.transport is not None:
            self.transport.on_event(rank, kind, value)


def start_rank0(opts: WorkerOptions, end_requests: Callable[[str], None]) -> Rank0:
    return Rank0(opts, end_requests)
