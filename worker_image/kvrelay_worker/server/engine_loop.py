"""Runs the engine on its own thread; the asyncio server talks to it through commands and queues.

Only the engine thread touches the engine. Calls from the event loop (``call``) or from other
threads (``call_soon``, e.g. the KV relay's release callback) are queued and run between steps;
step outputs are handed back to per-request asyncio queues with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from kvrelay_worker.engine import Engine, KVTarget, RequestOutput
from kvrelay_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """Delivered into a request's queue when its request cannot continue (step crash, KV failure)."""


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        metrics: WorkerMetrics | None = None,
        on_kv_target: Callable[[KVTarget], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.metrics = metrics
        self.on_kv_target = on_kv_target
        self._commands: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple, concurrent.futures.Future | None]
        ] = queue.SimpleQueue()
        self._subscribers: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None  # set when the engine thread died

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put((lambda: None, (), None))
        if self._thread.ident is not None:  # start-up may fail before the thread starts
            self._thread.join(timeout=10)

    # ---- event-loop side ------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread and await its result (exceptions propagate)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, args, fut))
        return await asyncio.wrap_future(fut)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Fire and forget, from any thread."""
        self._commands.put((fn, args, None))

    def subscribe(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._subscribers[request_id] = q
        return q

    def unsubscribe(self, request_id: str) -> None:
        self._subscribers.pop(request_id, None)

    def fail(self, request_id: str, message: str) -> None:
        """Event-loop side: end one request's stream with an error."""
        q = self._subscribers.get(request_id)
        if q is not None:
            q.put_nowait(EngineFailed(message))  # type: ignore[arg-type]

    def _fail_all(self, message: str) -> None:
        for q in self._subscribers.values():
            q.put_nowait(EngineFailed(message))  # type: ignore[arg-type]

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def _deliver(self, outputs: list[RequestOutput], targets: list[KVTarget]) -> None:
        for out in outputs:
            q = self._subscribers.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        for target in targets:
            if self.on_kv_target is not None:
                self.on_kv_target(target)

    # ---- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a dead engine must not leave clients waiting forever
            log.exception("engine thread died")
            self.error = exc
            self.loop.call_soon_threadsafe(self._fail_all, f"engine failed: {exc!r}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_work()
            self._drain(block)
            if self._stop.is_set():
                break
            if not self.engine.has_work():
                self._publish_stats()
                continue
            result = self.engine.step(time.monotonic())
            if self.metrics is not None:
                self.metrics.generation_tokens.inc(sum(len(o.new_token_ids) for o in result.outputs))
            if result.outputs or result.kv_targets:
                self.loop.call_soon_threadsafe(self._deliver, result.outputs, result.kv_targets)
            self._publish_stats()

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, args, fut = item
            try:
                value = fn(*args)
                if fut is not None:
                    fut.set_result(value)
            except BaseException as exc:
                if fut is not None:
                    fut.set_exception(exc)
                else:
                    log.exception("engine command %s failed", getattr(fn, "__name__", fn))
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _publish_stats(self) -> None:
        if self.metrics is None:
            return
        s = self.engine.stats()
        self.metrics.set_stats(s.num_running, s.num_waiting, s.num_queued_prefill_tokens, s.kv_cache_usage)
