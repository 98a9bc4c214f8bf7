"""Scale to zero on the replay (bench/sim/hold.py, zero.py): the real policy at minReplicas 0 takes
both pools to zero in an idle gap; the burst after it waits at the router through a cold start (its
TTFT counts the wait), bounded in number and time as the real router bounds it; GPU-hours fall."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import simpy
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.types import PolicyConfig, PolicyState, ReasonCode

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "bench"))

from sim.cluster import Cluster, Scraper  # noqa: E402
from sim.controllers import KvrelayController  # noqa: E402
from sim.hold import GaugeHistory, HoldBounds  # noqa: E402
from sim.model import ReplicaModel  # noqa: E402
from sim.replay import Scenario, Timeline, run  # noqa: E402
from sim.traces import idle_bursts  # noqa: E402
from sim.zero import KvrelayZeroController, compare_with_min_one, scale_to_zero_line  # noqa: E402

MODEL = ReplicaModel()
COLD = MODEL.cold_start_seconds  # 60 s
GAP = 600.0  # a scale-down window (180 s) and then some without a request
BURST = 120.0  # outlasts the wake-up: a decision, then a cold start
# Two requests a second for two minutes: one replica per role holds it once it serves.
TRACE = idle_bursts("gap_then_burst", [(1024, 200)], 2.0, idle_seconds=GAP, burst_seconds=BURST, cycles=1)
SHORT = Scenario(trace=TRACE, model=MODEL, ttft_slo_seconds=1.5, itl_slo_seconds=0.030)


def replay(min_replicas: int, hold: HoldBounds) -> tuple[dict[str, object], Timeline, KvrelayController]:
    """The real policy on the short trace from one warm replica per role."""
    scenario = dataclasses.replace(SHORT, min_replicas=min_replicas, hold=hold)
    controller = KvrelayController(scenario.policy_config())
    timeline = Timeline()
    return run(scenario, controller, (1, 1), timeline), timeline, controller


def woken_at(timeline: Timeline) -> float:
    """When both pools were asked back up after the gap (0 -> 1), by the control step's time."""
    pairs = zip(timeline.times, timeline.replicas["prefill"], timeline.replicas["decode"], strict=True)
    return next(t for t, p, d in pairs if t > GAP and p >= 1 and d >= 1)


def test_the_trace_is_silent_in_its_gap_and_busy_in_its_burst() -> None:
    arrivals = [at for at, _, _ in TRACE.requests]
    assert min(arrivals) >= GAP
    assert 0.7 * 2.0 * BURST <= len(arrivals) <= 1.3 * 2.0 * BURST
    with pytest.raises(ValueError, match="cycles >= 1"):
        idle_bursts("bad", [(1024, 200)], 2.0, cycles=0)


def test_pools_go_to_zero_in_the_gap_and_the_burst_waits_through_a_cold_start() -> None:
    line, timeline, controller = replay(0, HoldBounds(max_waiting=256, max_wait_seconds=180.0))
    counts = zip(timeline.times, timeline.replicas["prefill"], timeline.replicas["decode"], strict=True)
    in_gap = [(p, d) for t, p, d in counts if 300.0 <= t <= GAP]
    assert in_gap and set(in_gap) == {(0, 0)}
    # The sample stays usable at zero (the router's series are fresh, missing worker rates read 0):
    # no decision holds for want of metrics, and the wake-up is the held requests' doing.
    assert not any(d.hold for d in controller.decisions)
    woke = [d for d in controller.decisions if d.prefill.code == ReasonCode.REQUESTS_WAITING]
    assert woke and woke[0].decode.code == ReasonCode.REQUESTS_WAITING
    ready = woken_at(timeline) + COLD
    held = [k for k, waited in enumerate(timeline.waited_for_replicas) if waited]
    assert held == [k for k, at in enumerate(timeline.arrivals) if at < ready]  # all of them, none after
    # None lost within the bounds, and each held request's TTFT holds its wait for the cold start.
    assert not any(timeline.refused) and all(t is not None for t in timeline.ttft)
    for k in held:
        assert timeline.arrivals[k] + timeline.ttft[k] >= ready  # type: ignore[operator]
    assert timeline.ttft[held[0]] >= COLD  # type: ignore[operator]
    assert line["requests"] == len(TRACE.requests)


def test_scale_to_zero_spends_fewer_gpu_hours_than_min_one() -> None:
    hold = HoldBounds(max_waiting=256, max_wait_seconds=180.0)
    zero, zero_timeline, _ = replay(0, hold)
    one, one_timeline, _ = replay(1, hold)
    assert not any(one_timeline.waited_for_replicas)  # a replica per role always serves at min 1
    assert float(zero["gpu_hours"]) < float(one["gpu_hours"]) - 0.5  # type: ignore[arg-type]
    figures = compare_with_min_one(
        dataclasses.replace(SHORT, min_replicas=0, hold=hold), zero, zero_timeline, one, one_timeline
    )
    assert figures["gpu_hours_saved_vs_min_replicas_1"] == round(
        float(one["gpu_hours"]) - float(zero["gpu_hours"]),  # type: ignore[arg-type]
        3,
    )
    assert (
        figures["requests_at_zero"]
        == figures["requests_at_zero_served"]
        == sum(zero_timeline.waited_for_replicas)
    )
    assert figures["refused"] == 0 and figures["unanswered"] == 0
    # The wait is the price: tens of seconds more than at min 1, for the same requests.
    assert float(figures["extra_ttft_p50_seconds"]) > 10.0  # type: ignore[arg-type]
    assert float(figures["ttft_at_zero_p99_seconds"]) >= float(figures["ttft_at_zero_p50_seconds"])  # type: ignore[arg-type]


def test_a_cold_start_longer_than_the_max_wait_refuses_the_first_requests() -> None:
    max_wait = 30.0  # < the 60 s cold start
    _, timeline, _ = replay(0, HoldBounds(max_waiting=256, max_wait_seconds=max_wait))
    ready = woken_at(timeline) + COLD
    held = [k for k, waited in enumerate(timeline.waited_for_replicas) if waited]
    late = [k for k in held if timeline.arrivals[k] < ready - max_wait]
    assert late and all(timeline.refused[k] == "timeout" and timeline.ttft[k] is None for k in late)
    # Those that arrived within a max wait of the replicas turning ready are served after waiting.
    rest = [k for k in held if k not in late]
    assert rest and all(timeline.refused[k] is None and timeline.ttft[k] is not None for k in rest)
    assert all(timeline.ttft[k] < max_wait + 5.0 for k in rest)  # type: ignore[operator]


def test_a_full_hold_queue_refuses_at_once() -> None:
    _, timeline, _ = replay(0, HoldBounds(max_waiting=5, max_wait_seconds=180.0))
    held = [k for k, waited in enumerate(timeline.waited_for_replicas) if waited]
    served = [k for k in held if timeline.refused[k] is None]
    assert served == held[:5]  # the first five are held and served, later ones find the queue full
    assert {timeline.refused[k] for k in held[5:]} == {"queue_full"}


def test_the_scraper_exports_the_held_count_over_its_window_and_no_worker_series_at_zero() -> None:
    env = simpy.Environment()
    cluster = Cluster(env, MODEL, 0, 0, hold=HoldBounds(max_waiting=256, max_wait_seconds=20.0))
    scraper = Scraper(cluster, 0.99)
    env.process(cluster.arrivals([(5.0, 1024, 200), (6.0, 1024, 200)]))
    env.run(until=30.0)  # both held at 5-6 s, refused at 25-26 s: the gauge is 0 again now
    snapshot = scraper.snapshot()
    metrics = snapshot.metrics
    assert metrics is not None and metrics.observed_at == 30.0
    # max_over_time over the 60 s window still sees the two held requests
    assert (
        metrics.prefill_requests_waiting_for_replicas == metrics.decode_requests_waiting_for_replicas == 2.0
    )
    assert cluster.hold.refused["timeout"] == 2
    for name in ("prompt_tokens_per_second", "generation_tokens_per_second", "queued_prefill_tokens"):
        assert getattr(metrics, name) is None, name
    decision, _ = decide(snapshot, PolicyState(), scale_to_zero_config(), 30.0)
    assert not decision.hold and (decision.prefill.replicas, decision.decode.replicas) == (1, 1)


def scale_to_zero_config() -> PolicyConfig:
    """The short scenario's policy config at minReplicas 0."""
    return dataclasses.replace(SHORT, min_replicas=0).policy_config()


def test_the_held_gauge_keeps_its_maximum_for_a_window() -> None:
    gauge = GaugeHistory(0.0)
    gauge.set(10.0, 3.0)
    gauge.set(12.0, 0.0)
    assert gauge.value == 0.0
    assert gauge.max_over(since=0.0) == 3.0
    assert gauge.max_over(since=11.0) == 3.0  # 3 held until 12 s
    assert gauge.max_over(since=12.0) == 0.0
    with pytest.raises(ValueError, match="use 0 to turn holding off"):
        HoldBounds(max_waiting=-1)


def test_the_zero_line_reports_against_the_min_one_line() -> None:
    hold = HoldBounds(max_waiting=256, max_wait_seconds=180.0)
    scenario = dataclasses.replace(SHORT, hold=hold)
    one = run(scenario, KvrelayController(scenario.policy_config()), (1, 1))  # no timeline: replayed again
    line = scale_to_zero_line(scenario, (1, 1), [one])
    assert line["policy"] == KvrelayZeroController.name and line["min_replicas"] == 0
    assert line["gpu_hours_min_replicas_1"] == one["gpu_hours"]
    assert float(line["gpu_hours_saved_vs_min_replicas_1"]) > 0  # type: ignore[arg-type]
    assert line["hold_max_wait_seconds"] == 180.0 and line["refused"] == 0
