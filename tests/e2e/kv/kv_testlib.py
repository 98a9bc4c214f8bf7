"""Helpers for KV relay tests: peer processes (kv_peer.py) with bounded waits, shared constants.

A uniquely named module (not conftest) so test modules can import it whatever other conftest.py
files pytest has loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PEER = Path(__file__).with_name("kv_peer.py")
SECRET = "kv-test-secret"
# Which UCX transports each NIXL flavour uses; `lo` keeps UCX off other interfaces.
UCX_ENVS: dict[str, dict[str, str]] = {
    "nixl-tcp": {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"},
    "nixl-cma": {"UCX_NET_DEVICES": "lo"},  # default TLS: one-sided get over cma
    "tcp": {},
}
LAYOUT: dict[str, Any] = {
    "model_id": "tiny-llama@test",
    "num_layers": 4,
    "block_size": 8,
    "num_kv_heads": 4,
    "head_dim": 16,
    "dtype": "bfloat16",
}


class PeerProcess:
    """One kv_peer.py process; `call` sends a command and waits (bounded) for its reply line."""

    def __init__(self, flavour: str, cfg: dict[str, Any]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
        env.update(UCX_ENVS[flavour])
        env["PYTHONUNBUFFERED"] = "1"
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        backend = "tcp" if flavour == "tcp" else "nixl"
        self._send({"backend": backend, "secret": SECRET, **cfg})
        self._endpoint: str | None = None  # start-up is waited for lazily so peers boot in parallel

    def wait_ready(self) -> str:
        if self._endpoint is None:
            self._endpoint = self._recv(90)["endpoint"]
        return self._endpoint

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("KVPEER "):  # libraries (NIXL) log to stdout too
                self._lines.put(line[len("KVPEER ") :])
        self._lines.put(None)

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _recv(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer gave no reply in {timeout}s; stderr:\n{self.stderr_text()}") from None
        if line is None:
            raise AssertionError(f"peer exited (rc={self.proc.poll()}); stderr:\n{self.stderr_text()}")
        reply = json.loads(line)
        if "error" in reply:
            raise AssertionError(f"peer error: {reply['error']}")
        return reply

    def call(self, timeout: float = 30, **cmd: Any) -> dict[str, Any]:
        self.wait_ready()
        self._send(cmd)
        return self._recv(timeout)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-4000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def request_exit(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self._send({"op": "exit"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request_exit()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.stderr.close()


def make_peer(
    flavour: str, tp_size: int, tp_rank: int, num_blocks: int, extra: dict[str, Any]
) -> PeerProcess:
    layout = {**LAYOUT, **extra.pop("layout", {}), "tp_size": tp_size}
    return PeerProcess(flavour, {"layout": layout, "tp_rank": tp_rank, "num_blocks": num_blocks, **extra})


def shutdown_peers(peers: list[PeerProcess]) -> None:
    for peer in peers:  # ask all first so they shut down in parallel
        peer.kill(signal.SIGCONT)
        peer.request_exit()
    for peer in peers:
        peer.stop()


def wait_all_released(holder: PeerProcess, count: int, timeout: float = 10.0) -> dict[str, Any]:
    """Poll (bounded) until the holder has released `count` leases in total; returns its status."""
    deadline = time.monotonic() + timeout
    while True:
        status = holder.call(op="status")
        if len(status["released"]) >= count or time.monotonic() > deadline:
            return status
        time.sleep(0.05)
