"""A real `kvrelay-operator` process for control-plane tests that need one to die or hand over."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from kvrelay_envtest import free_port

LEASE_SECONDS = 3


class OperatorProcess:
    """A `python -m kvrelay_operator.main` child process with its log in a file."""

    def __init__(
        self, namespace: str, log: Path, lease_seconds: int = LEASE_SECONDS, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = log
        args = [
            sys.executable,
            "-m",
            "kvrelay_operator.main",
            "--namespace",
            namespace,
            "--lease-namespace",
            namespace,
            "--lease-duration",
            str(lease_seconds),
            "--liveness",
            f"http://127.0.0.1:{self.port}/healthz",
            "--metrics-port",
            str(self.metrics_port),
        ]
        self.proc = subprocess.Popen(
            args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def identity(self) -> str | None:
        match = re.search(r"waiting for the Lease \S+ as (\S+)", self.log.read_text(errors="replace"))
        return match.group(1) if match else None

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
            return response.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
