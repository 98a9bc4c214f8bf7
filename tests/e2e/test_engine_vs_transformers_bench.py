"""`bench/engine_vs_transformers.py --quick` end to end on the real SmolLM2 checkpoint: the equal-length
and mixed-workload settings each print their JSON line with finite figures. No speed is asserted:
figures are for the benchmark, not for tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def _finite(*values: object) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


def test_quick_run_prints_every_setting_with_finite_figures() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "engine_vs_transformers.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {x["setting"]: x for x in (json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{"))}
    assert set(lines) == {"equal_batch_1", "equal_batch_2", "mixed_saturated"}, proc.stdout
    for line in lines.values():
        assert line["bench"] == "engine_vs_transformers" and line["quick"] is True
        assert line["dtype"] == "float32" and line["threads"] >= 1
        assert isinstance(line["meets_target"], bool) and _finite(line["ratio"], line["target_ratio"])

    for batch in (1, 2):
        line = lines[f"equal_batch_{batch}"]
        assert line["batch"] == batch and line["prompt_tokens"] == 32 and line["output_tokens"] == 8
        assert _finite(line["kvrelay_tok_s"], line["transformers_tok_s"])
        assert len(line["ratio_runs"]) == line["repeats"] >= 1
        matched, total = map(int, line["same_tokens_as_transformers"].split("/"))
        assert total == batch and 0 <= matched <= total

    mixed = lines["mixed_saturated"]
    assert mixed["requests"] == 6 and mixed["max_seqs"] == 4
    assert mixed["output_tokens"]["total"] >= 6 * 4
    for side in ("kvrelay", "transformers_static"):
        figures = mixed[side]
        assert _finite(
            figures["useful_tok_s"], figures["wall_s"], figures["latency_p50_s"], figures["latency_p99_s"]
        )
        assert figures["latency_p50_s"] <= figures["latency_p99_s"] <= figures["wall_s"] * 1.001
    static = mixed["transformers_static"]
    assert static["batches"] == 2
    assert 0 < static["output_slot_utilisation"] <= 1 and 0 < static["prompt_slot_utilisation"] <= 1
