"""`bench/autoscaler_seeds.py` on a short cut of Azure's code trace: one JSON line per trace, with each
draw replayed against its own static baseline and the spread summarized honestly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_every_draw_is_replayed_and_summarized() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "autoscaler_seeds.py"),
         "--trace", "azure_code", "--seeds", "1,2,3", "--minutes", "8"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [line["trace"] for line in lines] == ["azure_code_x10"]
    line = lines[0]
    draws = line["draws"]
    assert [d["seed"] for d in draws] == [1, 2, 3]
    # Other draws are other traces: the superposed copies land elsewhere, so the figures differ.
    assert len({d["gpu_hours"] for d in draws}) > 1
    for d in draws:
        assert 0.0 <= d["slo_attainment"] <= 1.0 and d["gpu_hours"] > 0
        assert d["static_slo_attainment"] >= 0.99  # the baseline is the smallest static that meets 99%
        assert d["gpu_hours_vs_static"] == round(d["gpu_hours"] / d["static_gpu_hours"], 3)
    for key in ("slo_attainment", "gpu_hours", "gpu_hours_vs_static"):
        values = sorted(d[key] for d in draws)
        assert line[key] == {"median": values[1], "min": values[0], "max": values[2]}
    assert line["draws_below_99"] == sum(d["slo_attainment"] < 0.99 for d in draws)
