"""Scale to zero on the replay: kvrelay with minReplicas 0 for both roles, against the same policy at
minReplicas 1 in the same run, on a trace with idle gaps: GPU-hours saved, and the TTFT the requests
pay that arrive while a role has no ready replica (held at the router through a cold start, or
refused at its bounds: hold.py)."""

from __future__ import annotations

import dataclasses
import time

from sim.controllers import KvrelayController
from sim.replay import Scenario, Timeline, run

ZERO_POLICY = "kvrelay_scale_to_zero"
# Traces the replay also runs at minReplicas 0 (their idle gaps are what scale to zero is for).
ZERO_TRACES = frozenset({"idle_burst_zero"})


class KvrelayZeroController(KvrelayController):
    """The real policy, named apart in the output (its config has minReplicas 0 for both roles)."""

    name = ZERO_POLICY


def scale_to_zero_line(
    scenario: Scenario, initial: tuple[int, int], results: list[dict[str, object]]
) -> dict[str, object]:
    """Replay kvrelay at minReplicas 0 from `initial`; its JSON line, compared with the `kvrelay`
    line in `results` (minReplicas 1; its timeline is replayed again when the line lacks one)."""
    zero = dataclasses.replace(scenario, min_replicas=0)
    started = time.perf_counter()
    timeline = Timeline()
    line = run(zero, KvrelayZeroController(zero.policy_config()), initial, timeline)
    line["sim_wall_seconds"] = round(time.perf_counter() - started, 2)
    line["_timeline"] = timeline
    one = next(r for r in results if r["policy"] == "kvrelay")
    one_timeline = one.get("_timeline")
    if not isinstance(one_timeline, Timeline):
        one_timeline = Timeline()
        run(scenario, KvrelayController(scenario.policy_config()), initial, one_timeline)
    line.update(compare_with_min_one(zero, line, timeline, one, one_timeline))
    return line


def compare_with_min_one(
    zero: Scenario,
    line: dict[str, object],
    timeline: Timeline,
    one: dict[str, object],
    one_timeline: Timeline,
) -> dict[str, object]:
    """The scale-to-zero figures: GPU-hours saved against minReplicas 1, and the TTFT of the requests
    that arrived while a role had no ready replica, in both runs and per request the difference."""
    if len(timeline.ttft) != len(one_timeline.ttft):
        raise ValueError("the two runs replayed different traces: compare runs of one scenario")
    at_zero = [k for k, waited in enumerate(timeline.waited_for_replicas) if waited]
    served = [k for k in at_zero if timeline.ttft[k] is not None]
    both = [k for k in served if one_timeline.ttft[k] is not None]
    refused = [timeline.refused[k] for k in at_zero if timeline.refused[k] is not None]
    hours, hours_one = float(line["gpu_hours"]), float(one["gpu_hours"])  # type: ignore[arg-type]
    out: dict[str, object] = {
        "min_replicas": zero.min_replicas,
        "hold_max_waiting": zero.hold.max_waiting,
        "hold_max_wait_seconds": zero.hold.max_wait_seconds,
        "gpu_hours_min_replicas_1": hours_one,
        "gpu_hours_saved_vs_min_replicas_1": round(hours_one - hours, 3),
        "gpu_hours_vs_min_replicas_1": round(hours / hours_one, 3) if hours_one else None,
        "slo_attainment_min_replicas_1": one["slo_attainment"],
        "requests_at_zero": len(at_zero),
        "requests_at_zero_served": len(served),
        "refused": len(refused),
        "refused_queue_full": refused.count("queue_full"),
        "refused_timeout": refused.count("timeout"),
        # Neither answered nor refused by the end of the replay (none expected).
        "unanswered": sum(
            1 for t, r in zip(timeline.ttft, timeline.refused, strict=True) if t is None and r is None
        ),
    }
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        out[f"ttft_at_zero_{name}_seconds"] = _round(quantile([timeline.ttft[k] for k in served], q))
        out[f"ttft_at_zero_{name}_seconds_min_replicas_1"] = _round(
            quantile([one_timeline.ttft[k] for k in both], q)
        )
        out[f"extra_ttft_{name}_seconds"] = _round(
            quantile([timeline.ttft[k] - one_timeline.ttft[k] for k in both], q)  # type: ignore[operator]
        )
    return out


def quantile(values: list[float | None], q: float) -> float | None:
    """The `q` quantile (nearest rank, like the scraper's), None for no values."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
