"""bench/gpu_check.py's CPU smoke mode runs to the end and prints every figure, so the GPU check
(which only runs on a lent GPU machine, via bench/gpu_check.sh) cannot rot unnoticed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
EXPECTED = ["device", "model", "logits", "greedy", "paged", "decode", "prefill", "roofline", "summary"]


def numbers(value: object) -> list[float]:
    """Every int/float inside a JSON value (booleans excluded)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return []


def test_gpu_check_cpu_smoke_mode() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--size", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = [line["check"] for line in lines]
    assert list(dict.fromkeys(checks)) == EXPECTED, checks
    by = {}
    for line in lines:
        by.setdefault(line["check"], []).append(line)
        assert all(math.isfinite(x) for x in numbers(line)), line

    logits = by["logits"][0]
    assert logits["passed"] is True
    assert max(logits["prompt_lens"]) >= 1000
    for pair in ("kv16_vs_hf16", "hf16_vs_hf32", "kv16_vs_hf32", "kv32_vs_hf32"):
        assert set(logits[pair]) == {"max", "mean"}
    assert logits["hf16_vs_hf32"]["max"] > 0  # the bf16 noise the tolerance is relative to

    greedy = by["greedy"][0]
    assert greedy["passed"] is True and greedy["prompts"] == 16 and greedy["new_tokens"] == 64
    for run in ("engine_batch16", "engine_batch1"):
        acc = greedy[run]
        assert acc["identical"] + len(acc["diverged"]) == 16
        assert all({"prompt", "step", "ref_margin", "near_tie"} <= set(d) for d in acc["diverged"])

    assert by["paged"][0]["passed"] is True
    assert sorted(line["batch"] for line in by["decode"]) == [1, 16, 64]
    assert all(line["tok_s"] > 0 for line in by["decode"])
    assert by["prefill"][0]["prompt_len"] == 1024 and by["prefill"][0]["tok_s"] > 0
    roof = by["roofline"][0]
    assert roof["bandwidth_measured_gb_s"] > 0 and roof["fraction_of_roofline"] > 0
    assert roof["weight_bytes"] > 0 and roof["roofline_basis"]
    assert by["summary"][0] == {**by["summary"][0], "passed": True, "failures": []}
