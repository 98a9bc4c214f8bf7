"""The line between rank 0 and each other TP rank: steps and calls out, replies and events back.

One authenticated connection per rank (``multiprocessing.connection``: an HMAC challenge on
connect, then pickled messages in order). The model's all-reduces go over torch.distributed; this
line carries what only rank 0 decides: each step's inputs, the KV relay's publish and fetch calls,
and the other ranks' lease releases. Both ends send a heartbeat every second; a rank silent for
``LOST_AFTER_S`` or whose connection closes is lost, and a worker that lost a rank exits (a
worker is all of its ranks or nothing).

    rank 0 -> rank r:  ("init", info) ("step", StepInputs | None) ("call", id, op, args) ("ping",) ("stop",)
    rank r -> rank 0:  ("hello", rank, info) ("reply", id, ok, value) ("event", kind, value) ("ping",)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import pickle
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

log = logging.getLogger(__name__)

PING_EVERY_S = 1.0
LOST_AFTER_S = 10.0
CONNECT_RETRY_S = 0.2


class RankLost(RuntimeError):
    """A rank of this worker is gone: the worker cannot go on."""


class RemoteCallError(RuntimeError):
    """A call failed on another rank; ``reason`` is its error's reason (e.g. a KV failure label)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class _Line:
    """One connection; sends from several threads are serialised."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            self.conn.send_bytes(data)

    def send(self, msg: tuple[Any, ...]) -> None:
        self.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self, timeout: float) -> tuple[Any, ...]:
        """The next message; RankLost when the peer is silent past ``timeout`` or gone."""
        try:
            if not self.conn.poll(timeout):
                raise RankLost(f"no message or heartbeat for {timeout:.0f} s")
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise RankLost(f"connection closed ({type(exc).__name__})") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()


def _pinger(lines: Callable[[], list[_Line]], stopped: threading.Event) -> None:
    ping = pickle.dumps(("ping",))
    while not stopped.wait(PING_EVERY_S):
        for line in lines():
            with contextlib.suppress(OSError):  # the reader sees the closed connection and reports it
                line.send_bytes(ping)


class FollowerLinks:
    """Rank 0's end: a link to every other rank of the worker."""

    def __init__(
        self,
        host: str,
        port: int,
        authkey: bytes,
        ranks: list[int],
        on_lost: Callable[[int, str], None],
        on_event: Callable[[int, str, Any], None],
    ) -> None:
        self._listener = Listener((host, port), authkey=authkey)
        self.ranks = ranks
        self._on_lost = on_lost
        self._on_event = on_event
        self._lines: dict[int, _Line] = {}
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._ids = itertools.count()
        self._calls_lock = threading.Lock()
        self._stopped = threading.Event()
        self.info: dict[int, Any] = {}

    def accept(self, init: Any, timeout: float) -> dict[int, Any]:
        """Wait for every rank to connect and say hello; send each ``init`` first. Returns their infos."""
        done = threading.Event()
        error: list[BaseException] = []

        def accept_all() -> None:
            try:
                while len(self._lines) < len(self.ranks):
                    line = _Line(self._listener.accept())
                    line.send(("init", init))
                    kind, rank, info = line.recv(timeout)
                    if kind != "hello" or rank not in self.ranks or rank in self._lines:
                        line.close()
                        raise RankLost(f"unexpected first message {kind!r} from rank {rank!r}")
                    self._lines[rank], self.info[rank] = line, info
            except BaseException as exc:
                error.append(exc)
            finally:
                done.set()

        threading.Thread(target=accept_all, name="tp-accept", daemon=True).start()
        if not done.wait(timeout):
            self._listener.close()
            missing = sorted(set(self.ranks) - set(self._lines))
            raise RankLost(f"TP ranks {missing} did not join within {timeout:.0f} s")
        if error:
            raise error[0]
        self._listener.close()
        for rank, line in self._lines.items():
            threading.Thread(
                target=self._read, args=(rank, line), name=f"tp-link-{rank}", daemon=True
            ).start()
        threading.Thread(
            target=_pinger, args=(lambda: list(self._lines.values()), self._stopped), daemon=True
        ).start()
        return self.info

    def send_step(self, step: Any) -> None:
        """Every other rank runs this step's forward (sent before rank 0 runs its own)."""
        data = pickle.dumps(("step", step), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, line in self._lines.items():
            try:
                line.send_bytes(data)
            except OSError as exc:
                raise RankLost(f"TP rank {rank}: {exc}") from exc

    def call(self, rank: int, op: str, args: Any) -> concurrent.futures.Future[Any]:
        """Ask one rank to run ``op(args)``; its reply (or error) resolves the future."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        call_id = next(self._ids)
        with self._calls_lock:
            self._calls[call_id] = fut
        try:
            self._lines[rank].send(("call", call_id, op, args))
        except OSError as exc:
            with self._calls_lock:
                self._calls.pop(call_id, None)
            fut.set_exception(RankLost(f"TP rank {rank}: {exc}"))
        return fut

    def call_each(self, op: str, args: Any) -> list[concurrent.futures.Future[Any]]:
        return [self.call(rank, op, args) for rank in self.ranks]

    def stop(self) -> None:
        """Tell every rank to exit; they would also exit on the closed connections."""
        self._stopped.set()
        for line in self._lines.values():
            with contextlib.suppress(OSError):
                line.send(("stop",))
            line.close()

    def _read(self, rank: int, line: _Line) -> None:
        while True:
            try:
                msg = line.recv(LOST_AFTER_S)
            except RankLost as exc:
                if not self._stopped.is_set():
                    self._fail_calls(rank, str(exc))
                    self._on_lost(rank, str(exc))
                return
            kind = msg[0]
            if kind == "reply":
                _, call_id, ok, value = msg
                with self._calls_lock:
                    fut = self._calls.pop(call_id, None)
                if fut is not None:
                    fut.set_result(value) if ok else fut.set_exception(RemoteCallError(*value))
            elif kind == "event":
                try:
                    self._on_event(rank, msg[1], msg[2])
                except Exception:
                    log.exception("TP event %s from rank %d failed", msg[1], rank)

    def _fail_calls(self, rank: int, why: str) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(RankLost(f"TP rank {rank} lost: {why}"))


class LeaderLink:
    """A non-zero rank's end: steps go to a queue for the main thread; calls run on a pool."""

    def __init__(self, host: str, port: int, authkey: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._line = _Line(Client((host, port), authkey=authkey))
                break
            except (ConnectionRefusedError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise RankLost(f"cannot reach TP rank 0 at {host}:{port}: {exc}") from exc
                time.sleep(CONNECT_RETRY_S)
        kind, self.init = self._line.recv(timeout)
        if kind != "init":
            raise RankLost(f"rank 0 opened with {kind!r}, not init")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="tp-call")
        self._stopped = threading.Event()

    def hello(self, rank: int, info: Any) -> None:
        self._line.send(("hello", rank, info))

    def event(self, kind: str, value: Any) -> None:
        try:
            self._line.send(("event", kind, value))
        except OSError:
            log.warning("TP event %s not sent: the link to rank 0 is closed", kind)

    def serve(
        self,
        on_step: Callable[[Any], None],
        on_stop: Callable[[], None],
        handle_call: Callable[[str, Any], Any],
        on_lost: Callable[[str], None],
    ) -> None:
        """Read rank 0's messages on a thread until ``stop`` or loss."""

        def reply(call_id: int, op: str, args: Any) -> None:
            try:
                msg: tuple[Any, ...] = ("reply", call_id, True, handle_call(op, args))
            except Exception as exc:  # as (reason, message): exception types need not unpickle here
                msg = ("reply", call_id, False, (getattr(exc, "reason", type(exc).__name__), str(exc)))
            with contextlib.suppress(OSError):
                self._line.send(msg)

        def read() -> None:
            while True:
                try:
                    msg = self._line.recv(LOST_AFTER_S)
                except RankLost as exc:
                    if not self._stopped.is_set():
                        on_lost(str(exc))
                    return
                kind = msg[0]
                if kind == "step":
                    on_step(msg[1])
                elif kind == "call":
                    self._pool.submit(reply, msg[1], msg[2], msg[3])
                elif kind == "stop":
                    self._stopped.set()
                    on_stop()
                    return

        threading.Thread(target=read, name="tp-link", daemon=True).start()
        threading.Thread(target=_pinger, args=(lambda: [self._line], self._stopped), daemon=True).start()
