"""Spawn real ``kvrelay-worker`` processes for end-to-end tests (importable by any e2e test).

Every spawn picks free ports, waits for the worker's ``READY`` line with a bounded timeout, and
is stopped (SIGTERM, then SIGKILL) when its context exits, so no process outlives a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kvrelay_worker.ports import free_ports
from kvrelay_worker.processes import stop_process

READY_RE = re.compile(r"READY role=(\S+) grpc=(\S+) metrics=(\d+)(?: kv=(\S+))?")


@dataclass
class WorkerProcess:
    role: str
    proc: subprocess.Popen
    grpc_address: str = ""
    metrics_port: int = 0
    kv_endpoint: str | None = None
    output: list[str] = field(default_factory=list)

    def log(self, lines: int = 40) -> str:
        return "\n".join(self.output[-lines:])

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        return stop_process(self.proc, grace_s=timeout_s)


def worker_command(role: str, model_dir: Path, *args: str) -> list[str]:
    """The installed console script if present (what the image runs), else the module."""
    script = Path(sys.executable).with_name("kvrelay-worker")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "kvrelay_worker.entrypoint"]
    return [*head, "--role", role, "--model", str(model_dir), *args]


def spawn_worker(
    role: str, model_dir: Path, *extra: str, kv_backend: str = "tcp", threads: int = 1
) -> tuple[WorkerProcess, threading.Event]:
    """Start one worker on free ports; the event is set once it printed READY."""
    grpc_port, metrics_port = free_ports(2)
    args = [
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--kv-backend", kv_backend, "--threads", str(threads), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        worker_command(role, model_dir, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    worker = WorkerProcess(role, proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            worker.output.append(line.rstrip())
            m = READY_RE.search(line)
            if m:
                worker.grpc_address, worker.metrics_port, worker.kv_endpoint = m[2], int(m[3]), m[4]
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    return worker, ready


def _bind_failed(worker: WorkerProcess) -> bool:
    text = worker.log(200)
    return "Failed to bind" in text or "Address already in use" in text


@contextlib.contextmanager
def run_workers(
    specs: list[tuple[str, Path, tuple[str, ...]]],
    kv_backend: str = "tcp",
    ready_timeout_s: float = 120.0,
    threads: int = 1,
) -> Iterator[list[WorkerProcess]]:
    """Start several workers at once (their torch imports overlap), yield them all once serving;
    always stops every one of them."""
    started: list[tuple[WorkerProcess, threading.Event]] = []
    try:
        for role, model_dir, extra in specs:
            started.append(spawn_worker(role, model_dir, *extra, kv_backend=kv_backend, threads=threads))
        deadline = time.monotonic() + ready_timeout_s
        for i, (role, model_dir, extra) in enumerate(specs):
            retries = 2  # another test process may grab the same free port between pick and bind
            while not started[i][1].wait(0.2):
                worker = started[i][0]
                if worker.proc.poll() is not None and retries and _bind_failed(worker):
                    retries -= 1
                    started[i] = spawn_worker(role, model_dir, *extra, kv_backend=kv_backend, threads=threads)
                elif worker.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{worker.role} worker did not become ready:\n{worker.log()}")
        yield [worker for worker, _ in started]
    finally:
        for worker, _ in started:
            worker.stop()


@contextlib.contextmanager
def run_worker(
    role: str,
    model_dir: Path,
    *extra: str,
    kv_backend: str = "tcp",
    ready_timeout_s: float = 90.0,
    threads: int = 1,
) -> Iterator[WorkerProcess]:
    """Start one worker on free ports and yield it once it is serving; always stops it."""
    with run_workers([(role, model_dir, extra)], kv_backend, ready_timeout_s, threads) as (worker,):
        yield worker


# ---- request builders for the official tritonclient ----------------------------------------------


def sampling_bytes(**params: object) -> bytes:
    return json.dumps(params).encode()


def prefill_inputs(grpcclient, input_ids: list[int], **sampling: object) -> list:
    a = grpcclient.InferInput("input_ids", [len(input_ids)], "INT64")
    a.set_data_from_numpy(np.asarray(input_ids, dtype=np.int64))
    s = grpcclient.InferInput("sampling", [1], "BYTES")
    s.set_data_from_numpy(np.array([sampling_bytes(**sampling)], dtype=np.object_))
    return [a, s]


def decode_inputs(
    grpcclient, input_ids: list[int], first_token: int, kv_handle: bytes, **sampling: object
) -> list:
    a = grpcclient.InferInput("input_ids", [len(input_ids)], "INT64")
    a.set_data_from_numpy(np.asarray(input_ids, dtype=np.int64))
    f = grpcclient.InferInput("first_token", [1], "INT64")
    f.set_data_from_numpy(np.asarray([first_token], dtype=np.int64))
    h = grpcclient.InferInput("kv_handle", [1], "BYTES")
    h.set_data_from_numpy(np.array([kv_handle], dtype=np.object_))
    s = grpcclient.InferInput("sampling", [1], "BYTES")
    s.set_data_from_numpy(np.array([sampling_bytes(**sampling)], dtype=np.object_))
    return [a, f, h, s]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, or None if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (a TP worker's other ranks)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def process_alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except (OSError, IndexError):
        return False
