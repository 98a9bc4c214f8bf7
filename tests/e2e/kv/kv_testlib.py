"""Helpers for KV relay tests: peer processes (kv_peer.py) with bounded waits, shared constants.

A uniquely named module (not conftest) so test modules can import it whatever other conftest.py
files pytest has loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEER = Path(__file__).with_name("kv_peer.py")
SECRET = "kv-test-secret"


@dataclass(frozen=True)
class Flavour:
    """A relay flavour: the environment its peers run with, and the UCX transports a NIXL READ may use.

    Every NIXL flavour pins UCX_TLS, so UCX cannot quietly fall back to another transport, and
    `PeerProcess` checks in UCX's own protocol report (UCX_PROTO_INFO) which transport moved the bytes.
    """

    env: dict[str, str]
    read_transports: frozenset[str] = frozenset()  # empty: not NIXL, nothing to check


FLAVOURS: dict[str, Flavour] = {
    # Network-like path: one-sided READ emulated over tcp (the holder progresses UCX); `lo` keeps UCX
    # off other interfaces.
    "nixl-tcp": Flavour({"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}, frozenset({"tcp"})),
    # Zero-copy READ by the kernel (process_vm_readv). cma has no active messages, so tcp carries
    # wire-up and notifications.
    "nixl-cma": Flavour({"UCX_TLS": "cma,tcp", "UCX_NET_DEVICES": "lo"}, frozenset({"cma"})),
    # Shared-memory segments only (no cma, no tcp): the READ is emulated over posix/sysv shared
    # memory. These transports have no peer-failure handler, so UCX error handling must be off.
    "nixl-shm": Flavour(
        {"UCX_TLS": "posix,sysv", "KVRELAY_UCX_BACKEND_PARAMS": "ucx_error_handling_mode=none"},
        frozenset({"posix", "sysv"}),
    ),
    "tcp": Flavour({}),
}
# Settings inherited from the caller's environment would change what a flavour means.
_FLAVOUR_VARS = ("UCX_", "KVRELAY_UCX_")
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
        self.flavour = FLAVOURS[flavour]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FLAVOUR_VARS)}
        env.update(self.flavour.env)
        env["PYTHONUNBUFFERED"] = "1"
        self._logdir = Path(tempfile.mkdtemp(prefix="kvpeer-"))
        self.ucx_log = self._logdir / "ucx.log"
        if self.flavour.read_transports:  # UCX's protocol choices, in a file of their own
            env.update({"UCX_PROTO_INFO": "y", "UCX_LOG_FILE": str(self.ucx_log)})
        self._transport_checked = False
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
        """Send one command, return its reply; a NIXL peer's first successful fetch also checks the
        transport it used, so every test that reads over NIXL asserts its flavour's transport."""
        self.wait_ready()
        self._send(cmd)
        reply = self._recv(timeout)
        first_read = cmd["op"] == "fetch" and reply.get("ok") and not self._transport_checked
        if first_read and self.flavour.read_transports:
            self._transport_checked = True
            self.assert_read_transport()
        return reply

    def ucx_log_text(self) -> str:
        """UCX's log so far (flushed first: UCX writes it through buffered C stdio)."""
        self.call(op="flush_logs")
        return self.ucx_log.read_text(errors="replace") if self.ucx_log.exists() else ""

    def assert_read_transport(self) -> None:
        """This peer read over NIXL, and only over the transports its flavour pins."""
        log = self.ucx_log_text()
        used, allowed = read_transports(log), self.flavour.read_transports
        reads = [t for t in ucx_protocol_tables(log) if t[1].startswith("remote memory read")]
        assert used and used <= allowed, (
            f"NIXL READs went over {sorted(used) or 'no reported transport'}, expected only "
            f"{sorted(allowed)} (env {self.flavour.env}); UCX's READ protocol tables: {reads}"
        )

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
        shutil.rmtree(self._logdir, ignore_errors=True)


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


# UCX_PROTO_INFO=y prints one table per protocol selection, every line prefixed by the same
# "[timestamp] [host:pid:thread]"; e.g. (cells abbreviated):
#   | kvrelay-nixl-r0-0a1b intra-node cfg#1                              |
#   | remote memory read by ucp_get*(multi) into host memory from host   |
#   | 0..inf | zero-copy   | cma/memory                                   |
_LOG_PREFIX = re.compile(r"^(\[[\d.]+\] \[[^\]]+\])\s*(.*)$")
_TRANSPORT = re.compile(r"\b([a-z][a-z0-9_]*)/[\w.:-]+")


def ucx_protocol_tables(log: str) -> list[tuple[str, str, list[str]]]:
    """(endpoint config, operation, config cells) of each UCX_PROTO_INFO table in a UCX log."""
    groups: dict[str, list[str]] = {}
    for line in log.splitlines():
        if (m := _LOG_PREFIX.match(line)) and m.group(2).startswith("|"):
            groups.setdefault(m.group(1), []).append(m.group(2))
    tables = []
    for lines in groups.values():
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
        titles = [r[0] for r in rows if len(r) == 1]
        cells = [r[-1] for r in rows if len(r) >= 3 and r[0] != "Range"]
        if len(titles) >= 2:
            tables.append((titles[0], titles[1], cells))
    return tables


def read_transports(log: str) -> set[str]:
    """UCX transports (tcp, cma, posix, sysv, ...) chosen for remote-memory READs to other processes."""
    return {
        m.group(1)
        for cfg, operation, cells in ucx_protocol_tables(log)
        if operation.startswith("remote memory read") and " self " not in f" {cfg} "
        for cell in cells
        for m in _TRANSPORT.finditer(cell)
    }
