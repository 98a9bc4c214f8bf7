"""Shared by the router benchmarks: launch `kvrelay serve` / single workers, time token streams."""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvrelay_worker.processes import stop_process

URL_RE = re.compile(r"serving model '([^']+)' at (http://\S+/v1)")
WORKER_RE = re.compile(r"worker (\S+) pid=(\d+) grpc=(\S+)")


@dataclass
class Serve:
    base_url: str = ""
    model: str = ""
    workers: dict[str, str] = field(default_factory=dict)  # name -> grpc address


@contextlib.contextmanager
def launch_serve(
    args: Sequence[str], timeout_s: float = 300, log_lines: list[str] | None = None
) -> Iterator[Serve]:
    """`kvrelay serve --port 0 ...` as a child process; SIGTERM (which stops its workers) on exit.
    ``log_lines`` collects what serve printed up to its URL line (worker pids and ports)."""
    code = "from kvrelay_worker.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    serve = Serve()
    try:
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        for line in proc.stdout:
            if log_lines is not None:
                log_lines.append(line)
            if m := WORKER_RE.search(line):
                serve.workers[m.group(1)] = m.group(3)
            if m := URL_RE.search(line):
                serve.model, serve.base_url = m.group(1), m.group(2)
                break
            if time.monotonic() > deadline:
                break
        if not serve.base_url:
            raise RuntimeError("kvrelay serve did not start")
        yield serve
    finally:
        stop_process(proc, grace_s=30)


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (q in [0, 1]) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(quantile(values, 0.99) * 1e3, 3),
        # Rare long stalls (a decode step waiting behind a whole prefill) hide below p99.
        "p999_ms": round(quantile(values, 0.999) * 1e3, 3),
        "max_ms": round(max(values) * 1e3, 3),
        "n": len(values),
    }
