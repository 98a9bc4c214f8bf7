"""`bench/autoscaler_replay.py --quick` end to end: the real policy against four baselines on the
simulated cluster, replaying the synthetic staircase (+25% load steps up, then down)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
KEYS = {
    "trace", "policy", "slo_attainment", "ttft_attainment", "itl_attainment", "gpu_hours",
    "prefill_scale_events_per_hour", "prefill_reversals_per_hour", "decode_scale_events_per_hour",
    "decode_reversals_per_hour", "violation_seconds_after_steps", "gpu_hours_vs_static_peak",
    "gpu_hours_vs_sla_planner", "prefill_max_reversals_in_an_hour", "decode_max_reversals_in_an_hour",
    "dominated_by",
}  # fmt: skip


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    """policy -> its JSON line (one quick run, ~20 s of CPU)."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "autoscaler_replay.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert {line["trace"] for line in lines} == {"staircase_up_down"}
    return {line["policy"]: line for line in lines}


def test_every_policy_reports_every_figure(results: dict[str, dict[str, object]]) -> None:
    assert set(results) == {
        "static_peak", "static_mean_best_split", "sla_planner", "hpa", "kvrelay",
        "dynamo_throughput", "dynamo_load", "dynamo_sla", "dynamo_sla_both",
    }  # fmt: skip
    for policy, line in results.items():
        assert set(line) >= KEYS, (policy, KEYS - set(line))
        assert len(line["violation_seconds_after_steps"]) == 10  # type: ignore[arg-type]


def test_kvrelay_meets_the_slo_without_flapping_on_less_than_the_peak_static(
    results: dict[str, dict[str, object]],
) -> None:
    kv = results["kvrelay"]
    assert float(kv["slo_attainment"]) >= 0.99  # type: ignore[arg-type]
    assert float(kv["prefill_reversals_per_hour"]) <= 2  # type: ignore[arg-type]
    assert float(kv["decode_reversals_per_hour"]) <= 2  # type: ignore[arg-type]
    # The static baseline is the smallest fixed deployment that met 99% in the same run.
    assert float(results["static_peak"]["slo_attainment"]) >= 0.99  # type: ignore[arg-type]
    # 0.93x measured: the prefill surge headroom (+25% on this trace of +25% steps) costs ~6%.
    assert float(kv["gpu_hours_vs_static_peak"]) <= 0.95  # type: ignore[arg-type]


def test_kvrelay_beats_the_reactive_baselines_on_the_slo(results: dict[str, dict[str, object]]) -> None:
    kv = float(results["kvrelay"]["slo_attainment"])  # type: ignore[arg-type]
    for baseline in ("sla_planner", "hpa", "static_mean_best_split", "dynamo_throughput", "dynamo_sla_both"):
        assert kv > float(results[baseline]["slo_attainment"]) + 0.02, baseline  # type: ignore[arg-type]


def test_every_policy_has_its_pareto_position_and_the_bar_fields(
    results: dict[str, dict[str, object]],
) -> None:
    for policy, line in results.items():
        dominated = line["dominated_by"]
        assert isinstance(dominated, list)
        for other in dominated:  # each named policy is at least as good on both, better on one
            better = results[other]
            assert float(better["slo_attainment"]) >= float(line["slo_attainment"]), (policy, other)  # type: ignore[arg-type]
            assert float(better["gpu_hours"]) <= float(line["gpu_hours"]), (policy, other)  # type: ignore[arg-type]
        for role in ("prefill", "decode"):
            assert int(line[f"{role}_max_reversals_in_an_hour"]) >= 0  # type: ignore[call-overload]
    # The static peak meets 99%, so a policy under 99% on fewer GPU-hours is not dominated by it.
    assert results["kvrelay"]["dominated_by"] == []
    assert results["kvrelay"]["meets_issue_6_bar"] is False  # issue 6's bar stays out of reach (README)
