"""`bench/chaos.py --quick` end to end: workers are killed (SIGKILL and SIGTERM) and restarted under
open-loop streaming load; no request may fail or differ from the engine's greedy output, and drained
workers exit 0. No latency is asserted: figures are for the benchmark, not for tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_chaos_run_loses_no_request() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "chaos.py"), "--quick"],
        capture_output=True, text=True, timeout=420, cwd=REPO_ROOT / "bench",
    )  # fmt: skip
    lines = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    assert len(lines) == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    out = lines[0]
    assert out["bench"] == "chaos" and out["quick"] is True
    assert sum(out["kills"].values()) > 0 and out["sent"] > 0, out
    assert out["failed"] == 0, out["failures"]
    assert out["mismatched"] == 0, out["mismatches"]
    assert all(code == 0 for code in out["sigterm_exit_codes"]), out["sigterm_exit_codes"]
    assert out["baseline"]["failed"] == 0 and out["baseline"]["mismatched"] == 0, out["baseline"]
    assert proc.returncode == 0, proc.stderr[-3000:]
