"""The worker's HTTP port: Prometheus ``/metrics`` (liveness too) and ``/ready`` (the readinessProbe).

``/ready`` is 200 only while the worker serves: 503 before the model is loaded, once the engine
thread died, and from the first SIGTERM on (draining), so the pod leaves its Service's endpoints at
once. ``/metrics`` keeps answering while draining: liveness must not kill a draining worker.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

READY_PATH = "/ready"

# "serving" | "draining" | "not loaded" | "engine failed": anything but "serving" answers 503.
Readiness = Callable[[], str]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no log lines
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scrape must not hold the process at exit


def make_app(readiness: Readiness, registry: CollectorRegistry = REGISTRY) -> Callable[..., Iterable[bytes]]:
    """WSGI app: ``/ready`` from ``readiness()``, every other path the Prometheus exposition."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != READY_PATH:
            return metrics(environ, start_response)
        state = readiness()
        status = "200 OK" if state == "serving" else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{state}\n".encode()]

    return app


def start_http(host: str, port: int, readiness: Readiness) -> WSGIServer:
    """Serve on a daemon thread; stop with ``server.shutdown()`` and ``server.server_close()``."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, sockaddr = info[0][0], info[0][4]

    class Server(_ThreadingServer):
        address_family = family  # an IPv6 --host needs an AF_INET6 socket

    httpd = make_server(sockaddr[0], port, make_app(readiness), Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
