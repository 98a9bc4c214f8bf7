"""Runs the engine on its own thread; the asyncio server talks to it through an ``EngineChannel``.

Only the engine thread touches the engine. Calls from the event loop (``call``) or from other
threads (``call_soon``, e.g. the KV relay's release callback) are queued and run between steps;
step outputs are handed back to per-request asyncio queues with ``call_soon_threadsafe``, and
the KV targets the engine reports go to the ``on_kv_target`` callback given at construction.
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


class WorkerGone(EngineFailed):
    """The worker ends the request because it is going away (drain deadline), not because it is bad."""


class EngineChannel:
    """The asyncio side's line to the engine thread: calls go in, each request's outputs come back.

    Made before the engine loop and the KV bridge, which both use it: the bridge is also the loop's
    KV-target callback, so neither could be built from the other.
    """

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple, concurrent.futures.Future | None]
        ] = queue.SimpleQueue()
        self._subscribers: dict[str, asyncio.Queue[RequestOutput]] = {}

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

    def fail_all(self, message: str, error: type[EngineFailed] = EngineFailed) -> None:
        for q in self._subscribers.values():
            q.put_nowait(error(message))  # type: ignore[arg-type]

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Event-loop side: hand each output to its request's queue."""
        for out in outputs:
            q = self._subscribers.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def next_command(
        self, timeout: float | None
    ) -> tuple[Callable[..., Any], tuple, concurrent.futures.Future | None] | None:
        """Engine thread: the next queued call, waiting up to ``timeout`` (None: don't wait)."""
        try:
            return self._commands.get(timeout=timeout) if timeout is not None else self._commands.get_nowait()
        except queue.Empty:
            return None


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        metrics: WorkerMetrics | None = None,
        on_kv_target: Callable[[KVTarget], None] | None = None,
        channel: EngineChannel | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        # engine thread, instead of failing every request in-band: a TP worker ends them as a lost worker
        self._on_error = on_error
        self.loop = loop
        self.metrics = metrics
        self._on_kv_target = on_kv_target  # event-loop thread, once per KVTarget the engine reports
        self.channel = channel or EngineChannel()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None  # set when the engine thread died

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.channel.call_soon(lambda: None)
        if self._thread.ident is not None:  # start-up may fail before the thread starts
            self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    # ---- event-loop side ------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], targets: list[KVTarget]) -> None:
        self.channel.deliver(outputs)
        if self._on_kv_target is not None:
            for target in targets:
                self._on_kv_target(target)

    # ---- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a dead engine must not leave clients waiting forever
            log.exception("engine thread died")
            self.error = exc
            if self._on_error is not None:  # it ends the requests its own way
                self._on_error(exc)
            else:
                self.loop.call_soon_threadsafe(self.channel.fail_all, f"engine failed: {exc!r}")

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
                if result.num_prompt_tokens:
                    self.metrics.prompt_tokens_computed.inc(result.num_prompt_tokens)
            # Gauges first: a client that has its last token and then scrapes /metrics sees this step.
            self._publish_stats()
            if result.outputs or result.kv_targets:
                self.loop.call_soon_threadsafe(self._deliver, result.outputs, result.kv_targets)

    def _drain(self, block: bool) -> None:
        item = self.channel.next_command(0.5 if block else None)
        while item is not None:
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
            item = self.channel.next_command(None)

    def _publish_stats(self) -> None:
        if self.metrics is None:
            return
        self.metrics.set_stats(self.engine.stats())
