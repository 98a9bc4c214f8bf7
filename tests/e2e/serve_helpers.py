"""Run `kvrelay serve` as a real process for e2e tests and benchmarks; always stopped, workers included."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay_worker.processes import stop_process

URL_RE = re.compile(r"serving model '([^']+)' at (http://\S+/v1)")
WORKER_RE = re.compile(r"worker (\S+) pid=(\d+) grpc=(\S+) metrics=:(\d+)")
START_TIMEOUT_S = float(os.environ.get("KVRELAY_E2E_START_TIMEOUT", "240"))


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    base_url: str = ""
    model: str = ""
    workers: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (pid, grpc address)
    output: list[str] = field(default_factory=list)
    leftovers: list[int] = field(default_factory=list)  # worker pids still alive after serve exited

    def pid_of_address(self, address: str) -> int:
        return next(pid for pid, addr in self.workers.values() if addr == address)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not alive for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


@contextlib.contextmanager
def run_serve(args: list[str], log_dir: Path) -> Iterator[ServeProcess]:
    """Start `kvrelay serve --port 0 ...`, wait for its URL line, and on exit SIGTERM it and check cleanup."""
    command = [
        sys.executable, "-c", "from kvrelay_worker.cli import main; main()",
        "serve", "--port", "0", "--log-dir", str(log_dir), *args,
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    serve = ServeProcess(proc)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            serve.output.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not serve.base_url:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(0.1, remaining))
            except queue.Empty:
                line = ""
            if line is None or remaining <= 0:
                raise RuntimeError("kvrelay serve did not come up:\n" + "\n".join(serve.output[-40:]))
            if m := WORKER_RE.search(line):
                serve.workers[m.group(1)] = (int(m.group(2)), m.group(3))
            if m := URL_RE.search(line):
                serve.model, serve.base_url = m.group(1), m.group(2)
        yield serve
    finally:
        stop_process(proc, grace_s=30)
        # Belt and braces: never leave a worker behind, even if serve misbehaved.
        serve.leftovers = [pid for pid, _ in serve.workers.values() if pid_alive(pid)]
        for pid in serve.leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reader.join(timeout=5)
