"""`kvrelay serve` start-up failures are reported clearly and leave nothing running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import WORKER_RE, pid_alive

pytestmark = pytest.mark.e2e


def test_worker_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    command = [
        sys.executable, "-c", "from kvrelay_worker.cli import main; main()",
        "serve", "--model", "tiny", "--port", "0", "--log-dir", str(tmp_path), "--worker-arg=--no-such-flag",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "exited with code 2 during start-up" in done.stdout
    assert "unrecognized arguments: --no-such-flag" in done.stdout  # the worker's own log, quoted
    assert done.stdout.rstrip().endswith("kvrelay: stopped")
    pids = [int(m.group(2)) for line in done.stdout.splitlines() if (m := WORKER_RE.search(line))]
    assert len(pids) == 2 and not any(pid_alive(pid) for pid in pids)
