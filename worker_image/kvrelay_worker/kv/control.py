"""Small control channel: length-prefixed JSON frames over TCP, one thread per connection."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from .handle import KVTransferError

log = logging.getLogger(__name__)
_LEN = struct.Struct("!I")
MAX_FRAME = 16 << 20


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("peer closed the connection")
        view = view[got:]
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    (size,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if size > MAX_FRAME:
        raise ConnectionError(f"control frame of {size} bytes exceeds {MAX_FRAME}")
    return json.loads(recv_exact(sock, size))


def error_frame(err: KVTransferError) -> dict[str, Any]:
    return {"ok": False, "reason": err.reason, "message": str(err)}


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class ControlServer:
    """Accepts connections on (host, port) and runs `handler(sock)` for each in its own thread."""

    def __init__(self, host: str, port: int, handler: Callable[[socket.socket], None], name: str) -> None:
        self._sock = socket.create_server((host, port), reuse_port=False)
        self._sock.settimeout(0.2)  # so close() is noticed without a wake-up connection
        self.port: int = self._sock.getsockname()[1]
        self._handler = handler
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                conn.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._handler(conn)
        except (ConnectionError, OSError, TimeoutError) as exc:
            log.debug("control connection ended: %s", exc)
        except Exception:
            log.exception("control handler failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
