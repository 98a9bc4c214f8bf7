"""Run `kvrelay serve` as a real process for e2e tests and benchmarks (always stopped, workers included),
`kvrelay profile` against it, and a closed-loop streaming load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
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
from typing import Any

import httpx
import yaml
from kvrelay_worker.processes import stop_process

URL_RE = re.compile(r"serving model '([^']+)' at (http://\S+/v1)")
WORKER_RE = re.compile(r"worker (\S+) pid=(\d+) grpc=(\S+) metrics=:(\d+)")
START_TIMEOUT_S = float(os.environ.get("KVRELAY_E2E_START_TIMEOUT", "240"))
# The `kvrelay` CLI as a user runs it, from this interpreter's environment (the console script's entry).
KVRELAY_CLI = [sys.executable, "-c", "from kvrelay_worker.cli import main; main()"]


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    base_url: str = ""
    model: str = ""
    workers: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (pid, grpc address)
    output: list[str] = field(default_factory=list)
    leftovers: list[int] = field(default_factory=list)  # worker pids still alive after serve exited
    log_dir: Path | None = None  # the workers' logs (`--log-dir`)

    def pid_of_address(self, address: str) -> int:
        return next(pid for pid, addr in self.workers.values() if addr == address)

    def worker_report(self, lines: int = 15) -> str:
        """Each worker: alive or not, and its log's last lines (for a failure message: pytest removes
        old temporary directories, so a CI failure keeps only what it printed)."""
        out = []
        for name, (pid, address) in sorted(self.workers.items()):
            state = "alive" if pid_alive(pid) else "gone"
            log = self.log_dir / f"{name}.log" if self.log_dir else None
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log and log.exists() else []
            out.append(f"--- {name} pid {pid} at {address}: {state}\n" + "\n".join(tail))
        return "\n".join(out)


# A frozen decode worker's last tokens reach the router within this (a local gRPC stream).
FROZEN_SETTLE_S = 0.5


def freeze_while_relaying(router_url: str, pid: int, address: str) -> bool:
    """SIGSTOP decode worker `pid` (at `address`); True, left frozen, if the router still relays a stream
    from it once what it sent before has arrived, else resumed and False.

    For a kill under live streams: between choosing a worker and killing it, a loaded machine can let it
    finish its last streams, and a kill that lands on none tests nothing (CI saw that twice)."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(FROZEN_SETTLE_S)
    health = httpx.get(router_url.removesuffix("/v1") + "/health", timeout=10).json()
    if health["workers"]["decode"][address]["running"] > 0:
        return True
    os.kill(pid, signal.SIGCONT)
    return False


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
    command = [*KVRELAY_CLI, "serve", "--port", "0", "--log-dir", str(log_dir), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    serve = ServeProcess(proc, log_dir=log_dir)
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


@dataclass(frozen=True)
class Profile:
    """What `kvrelay profile` wrote (the patch's spec.autoscaling.profile) and printed (every level)."""

    patch: dict[str, Any]
    measurements: dict[str, Any]
    seconds: float

    @property
    def profile(self) -> dict[str, float]:
        return self.patch["spec"]["autoscaling"]["profile"]

    def points(self, role: str) -> list[dict[str, Any]]:
        return [p for p in self.measurements["points"] if p["role"] == role]


def run_profile(base_url: str, out: Path, *args: str, timeout_s: float = 300) -> Profile:
    """`kvrelay profile --url BASE_URL --out OUT ARGS` as a subprocess; the profile read back from OUT."""
    start = time.monotonic()
    proc = subprocess.run(
        [*KVRELAY_CLI, "profile", "--url", base_url, "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    assert proc.returncode == 0, f"kvrelay profile exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return Profile(
        patch=yaml.safe_load(out.read_text()),
        measurements=json.loads(proc.stdout.splitlines()[0]),
        seconds=time.monotonic() - start,
    )


class StreamLoad:
    """`streams` closed-loop streaming completions (EOS ignored) from one asyncio thread until stopped.

    Raw SSE lines over httpx, so that many streams cost the client little CPU next to the workers. The
    streams start spread over `spread_s` and their outputs vary around `max_tokens` (3/4 to 5/4), so that
    they do not move in step (all prefilling, then all decoding) as streams started together would."""

    def __init__(
        self, base_url: str, model: str, streams: int, prompt: str, max_tokens: int, spread_s: float = 2.0
    ) -> None:
        self.url, self.streams, self.spread_s = base_url.rstrip("/") + "/completions", streams, spread_s
        self.body = {"model": model, "prompt": prompt, "temperature": 0.0, "stream": True, "ignore_eos": True}
        self.max_tokens = max_tokens
        self.done = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        # Idle connections expire before uvicorn's 5 s keep-alive closes them: a request sent on one that
        # the server is closing at that moment fails with a ReadError.
        limits = httpx.Limits(
            max_connections=self.streams, max_keepalive_connections=self.streams, keepalive_expiry=1.0
        )
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(self._stream(client, i) for i in range(self.streams)))

    async def _stream(self, client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(self.spread_s * index / self.streams)
        sent = 0
        while not self._stop.is_set():
            # 3/4, 7/8, 1, 9/8, 5/4 of max_tokens in turn, shifted per stream
            max_tokens = self.max_tokens * (6 + (index + sent) % 5) // 8
            try:
                chunks = 0
                body = {**self.body, "max_tokens": max_tokens}
                async with client.stream("POST", self.url, json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        chunks += line.startswith("data: {")
                assert chunks >= 2, f"request streamed {chunks} chunks"
                self.done += 1
            except BaseException as exc:  # reported by the caller, never swallowed
                self.errors.append(exc)
                return
            sent += 1

    def __enter__(self) -> StreamLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "load did not stop"
        assert not self.errors, self.errors[:3]


def streams_needed(tokens_per_second: float, itl_slo_s: float, factor: float) -> int:
    """Streams that, each served at the ITL SLO (1/SLO tokens/s), ask `factor` times `tokens_per_second`."""
    return math.ceil(factor * tokens_per_second * itl_slo_s)
