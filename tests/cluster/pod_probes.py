"""Startup, readiness and liveness probes (tcpSocket, httpGet, exec) against a pod's address.

To keep tests fast a probe runs at most every `max_period_s` (default 1 s) instead of its
periodSeconds, and its failureThreshold is scaled up so that the time a probe may keep failing
(failureThreshold x periodSeconds) is the same as the spec asks for. initialDelaySeconds is kept.
"""

from __future__ import annotations

import http.client
import math
import socket
import ssl
import subprocess
from collections.abc import Callable
from typing import Any

ExecFn = Callable[[list[str], float], int]  # (command, timeout) -> exit code


def resolve_port(port: int | str, container: dict[str, Any]) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ValueError(f"the container has no port named {port!r}")


def _http_get(action: dict[str, Any], host: str, port: int, timeout: float) -> tuple[bool, str]:
    if action.get("scheme", "HTTP").upper() == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the kubelet does not verify probe certificates either
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
    try:
        conn.request("GET", action.get("path", "/"), headers=headers)
        status = conn.getresponse().status
    finally:
        conn.close()
    return 200 <= status < 400, f"HTTP {status}"


def run_probe(
    probe: dict[str, Any], container: dict[str, Any], pod_ip: str, exec_fn: ExecFn
) -> tuple[bool, str]:
    """Runs one probe once: (success, a message for the log)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "tcpSocket" in probe:
            action = probe["tcpSocket"]
            port = resolve_port(action["port"], container)
            with socket.create_connection((action.get("host") or pod_ip, port), timeout=timeout):
                return True, f"tcp {port} open"
        if "httpGet" in probe:
            action = probe["httpGet"]
            port = resolve_port(action["port"], container)
            return _http_get(action, action.get("host") or pod_ip, port, timeout)
        if "exec" in probe:
            code = exec_fn(list(probe["exec"]["command"]), timeout)
            return code == 0, f"exec exited {code}"
    except (OSError, ValueError, http.client.HTTPException, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return False, f"unsupported probe handler {sorted(probe)}"


class Prober:
    """One probe's schedule and verdict: None until decided, then True/False by its thresholds."""

    def __init__(self, probe: dict[str, Any], now: float, max_period_s: float, initial: bool | None) -> None:
        self.probe = probe
        period = float(probe.get("periodSeconds", 10))
        self.interval = min(period, max_period_s)
        self.failure_threshold = math.ceil(int(probe.get("failureThreshold", 3)) * period / self.interval)
        self.success_threshold = int(probe.get("successThreshold", 1))
        self.next_due = now + float(probe.get("initialDelaySeconds", 0))
        self.successes = self.failures = 0
        self.result = initial
        self.message = ""

    def due(self, now: float) -> bool:
        return now >= self.next_due

    def record(self, ok: bool, message: str, now: float) -> None:
        """Counts one outcome: successThreshold (or scaled failureThreshold) in a row sets the verdict."""
        self.message = message
        self.next_due = now + self.interval
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold:
                self.result = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= self.failure_threshold:
                self.result = False
