"""Dynamo planner modes as replay baselines (bench/sim/dynamo_planner.py): each scales on the condition
its docs give, one replica per interval, not while its replicas load, within bounds; and a short replay."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from kvrelay_operator.autoscaler.types import MetricsSample, RoleReplicas, Snapshot

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "bench"))

from sim.cluster import FrontendStats  # noqa: E402
from sim.controllers import SlaPlannerController  # noqa: E402
from sim.dynamo_planner import (  # noqa: E402
    LLAMA31_CONTEXT_LENGTH,
    DynamoLoadController,
    DynamoSlaCombinedController,
    DynamoSlaReactiveController,
    DynamoThroughputController,
    dynamo_controllers,
    run_dynamo,
)
from sim.model import ReplicaModel  # noqa: E402
from sim.replay import Scenario  # noqa: E402
from sim.traces import Trace  # noqa: E402

MODEL = ReplicaModel()
FRONTEND = FrontendStats(100, 5.0, 1000.0, 200.0)


def sla() -> DynamoSlaReactiveController:
    """The reactive `sla` mode with the chat traces' SLOs (TTFT 1.5 s, ITL 30 ms)."""
    return DynamoSlaReactiveController(MODEL, 1, 64, ttft_slo_seconds=1.5, itl_slo_seconds=0.030)


def snap(
    prefill: tuple[int, int] = (2, 2),
    decode: tuple[int, int] = (2, 2),
    queued: float = 0.0,
    kv: float = 0.7,
    running: float = 100.0,
    waiting: float = 0.0,
) -> Snapshot:
    """Snapshot with (current, ready) per role and the pool gauges Dynamo's signals come from."""
    metrics = MetricsSample(
        observed_at=0.0,
        queued_prefill_tokens=queued,
        kv_cache_usage_ratio=kv,
        decode_requests_running=running,
        decode_requests_waiting=waiting,
    )
    return Snapshot(
        metrics=metrics,
        prefill=RoleReplicas(current=prefill[0], ready=prefill[1]),
        decode=RoleReplicas(current=decode[0], ready=decode[1]),
    )


def test_throughput_prefill_scales_on_queued_tokens_per_engine_against_context_length() -> None:
    ctx = LLAMA31_CONTEXT_LENGTH
    # Two engines: the pool queue is split evenly, so 2 x ctx tokens put each at the 1.0 threshold.
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(queued=2 * ctx), 5, FRONTEND)[0] == 3
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(queued=2 * ctx - 2), 5, FRONTEND)[0] == 2
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(queued=0.19 * ctx), 5, FRONTEND)[0] == 1
    # 0.1 of the context length per engine is not below the scale-down threshold.
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(queued=0.2 * ctx), 5, FRONTEND)[0] == 2


def test_throughput_decode_scales_on_kv_use_plus_queued_kv() -> None:
    capacity = MODEL.kv_capacity_tokens
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(kv=1.0), 5, FRONTEND)[1] == 2
    # 0.9 in use plus queued prompts (1000 tokens each) worth 0.2 of each engine's cache: > 1.0.
    waiting = 2 * 0.2 * capacity / 1000
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(kv=0.9, waiting=waiting), 5, FRONTEND)[1] == 3
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(kv=0.59), 5, FRONTEND)[1] == 1
    assert DynamoThroughputController(MODEL, 1, 64).decide(snap(kv=0.6), 5, FRONTEND)[1] == 2


def test_one_decision_per_interval_one_replica_at_a_time() -> None:
    ctl = DynamoThroughputController(MODEL, 1, 64)
    busy = snap(queued=10 * LLAMA31_CONTEXT_LENGTH, kv=1.5)
    assert ctl.decide(busy, 5.0, FRONTEND) == (3, 3)
    # 3 s later: not due yet, whatever the load.
    assert ctl.decide(snap(prefill=(3, 3), decode=(3, 3), queued=1e7, kv=2.0), 8.0, FRONTEND) == (3, 3)
    assert ctl.decide(snap(prefill=(3, 3), decode=(3, 3), queued=1e7, kv=2.0), 10.0, FRONTEND) == (4, 4)


def test_a_role_with_replicas_loading_is_not_decided_on() -> None:
    ctl = DynamoThroughputController(MODEL, 1, 64)
    # Prefill has one replica loading (current 3, ready 2): held; decode is still decided.
    assert ctl.decide(snap(prefill=(3, 2), queued=1e7, kv=0.1), 5.0, FRONTEND) == (3, 1)


def test_bounds_and_never_below_one_ready_engine() -> None:
    at_max = snap(prefill=(4, 4), decode=(4, 4), queued=1e8, kv=2.0)
    assert DynamoThroughputController(MODEL, 1, 4).decide(at_max, 5.0, FRONTEND) == (4, 4)
    idle = snap(prefill=(1, 1), decode=(1, 1), queued=0.0, kv=0.0)
    assert DynamoThroughputController(MODEL, 1, 4).decide(idle, 5.0, FRONTEND) == (1, 1)
    floor = snap(prefill=(3, 3), decode=(3, 3), queued=0.0, kv=0.0)
    assert DynamoThroughputController(MODEL, 3, 8).decide(floor, 5.0, FRONTEND) == (3, 3)
    with pytest.raises(ValueError, match="min_r"):
        DynamoThroughputController(MODEL, 5, 4)


def test_load_mode_thresholds_and_their_validation() -> None:
    capacity = MODEL.kv_capacity_tokens
    assert DynamoLoadController(MODEL, 1, 64).decide(snap(queued=2.0, kv=0.9), 5, FRONTEND) == (3, 3)
    assert DynamoLoadController(MODEL, 1, 64).decide(snap(queued=0.0, kv=0.7), 5, FRONTEND) == (1, 1)
    assert DynamoLoadController(MODEL, 1, 64).decide(snap(queued=1.0, kv=0.8), 5, FRONTEND) == (2, 2)
    # Queued decode KV counts: 0.8 in use + 0.15 waiting per engine >= 90%.
    waiting = 2 * 0.15 * capacity / 1000
    crowded = snap(queued=1.0, kv=0.8, waiting=waiting)
    assert DynamoLoadController(MODEL, 1, 64).decide(crowded, 5, FRONTEND)[1] == 3
    custom = DynamoLoadController(
        MODEL, 1, 64, prefill_scale_up_queue_tokens=20_000, prefill_scale_down_queue_tokens=2_000
    )
    assert custom.decide(snap(queued=30_000.0), 5, FRONTEND)[0] == 2
    with pytest.raises(ValueError, match="prefill_scale_up_queue_tokens"):
        DynamoLoadController(MODEL, 1, 64, prefill_scale_up_queue_tokens=5, prefill_scale_down_queue_tokens=5)
    with pytest.raises(ValueError, match="decode_scale_down_kv_rate"):
        DynamoLoadController(MODEL, 1, 64, decode_scale_up_kv_rate=60.0, decode_scale_down_kv_rate=70.0)


def test_sla_reactive_scales_on_estimated_ttft_and_itl_against_the_slo() -> None:
    ctl = sla()
    ctl.lengths.observe(FRONTEND)
    per_token = MODEL.prefill_seconds(1000) / 1000
    # A queue of ~2 s of prefill work per engine: above 1.5 s.
    deep = 2 * 2.0 / per_token
    empty = snap(queued=0.0, running=20.0)
    assert ctl.estimated_ttft(ctl._views(snap(queued=deep))[0]) > 1.5  # type: ignore[operator]
    assert ctl.estimated_ttft(ctl._views(empty)[0]) < 1.5 * 0.8  # type: ignore[operator]
    assert sla().decide(snap(queued=deep, running=20), 5, FRONTEND)[0] == 3
    assert sla().decide(empty, 5, FRONTEND) == (1, 1)
    # Decode: 256 running per engine at ~1.1k context makes a step over 30 ms.
    full = snap(running=512.0, queued=0.0)
    assert ctl.estimated_itl(ctl._views(full)[1]) > 0.030  # type: ignore[operator]
    assert sla().decide(full, 5, FRONTEND)[1] == 3
    # Near the SLO (between 0.8 x SLO and the SLO) both roles hold.
    step = MODEL.decode_step_seconds
    batch = next(b for b in range(1, 257) if step(b + 1, (b + 1) * 1100) > 0.8 * 0.030)
    assert step(batch + 1, (batch + 1) * 1100) <= 0.030
    held = snap(running=2.0 * batch, queued=2 * 1.3 / per_token)
    assert sla().decide(held, 5, FRONTEND) == (2, 2)


def test_sla_reactive_holds_until_it_has_seen_request_lengths() -> None:
    ctl = sla()
    assert ctl.decide(snap(queued=1e7, running=512.0), 5, FrontendStats(0, 5.0, None, None)) == (2, 2)


def test_sla_both_lifts_the_reactive_step_to_the_predictive_floor() -> None:
    reactive = sla()
    predictive = SlaPlannerController(MODEL, 1.5, 0.030, 1, 64)
    ctl = DynamoSlaCombinedController(reactive, predictive)
    quiet = snap(prefill=(1, 1), decode=(1, 1), queued=0.0, kv=0.1, running=5.0)
    # 36 five-second windows of 50 req/s, 2000-token prompts: the predictive step at 180 s sizes for it.
    busy = FrontendStats(250, 5.0, 2000.0, 200.0)
    for k in range(1, 36):
        assert ctl.decide(quiet, 5.0 * k, busy) == (1, 1)
    wanted = ctl.decide(quiet, 180.0, busy)
    need = 50 * 2000 / MODEL.prefill_tokens_per_second(2000)
    assert wanted[0] >= need > 1
    with pytest.raises(ValueError, match="throughput_interval_seconds"):
        DynamoSlaCombinedController(reactive, predictive, throughput_interval_seconds=5.0)


def test_short_replay_of_each_mode_gives_a_full_result_line() -> None:
    # 5 minutes: 2 requests/s for 2 minutes, then 16/s.
    requests = [(i * 0.5, 1024, 100) for i in range(240)] + [(120 + i / 16, 1024, 100) for i in range(2880)]
    scenario = Scenario(Trace("step", requests), MODEL, ttft_slo_seconds=1.5, itl_slo_seconds=0.03)
    controllers = dynamo_controllers(scenario, with_combined=True)
    assert set(controllers) == {"dynamo_throughput", "dynamo_load", "dynamo_sla", "dynamo_sla_both"}
    results = {name: run_dynamo(scenario, ctl, (1, 1)) for name, ctl in controllers.items()}
    for name, line in results.items():
        assert line["policy"] == name
        assert line["requests"] == len(requests)
        assert 0.0 <= float(line["slo_attainment"]) <= 1.0  # type: ignore[arg-type]
        # At least the two starting replicas for the 7 minutes replayed (5 + the 2-minute tail).
        assert float(line["gpu_hours"]) >= 2 * 4 * 7 / 60 - 1e-3  # type: ignore[arg-type]
        assert {"prefill_reversals_per_hour", "decode_reversals_per_hour"} <= set(line)
    # 16 req/s of 1024-token prompts is ~1.3 prefill replicas of work: every mode adds prefill (even the
    # default's 131k-token queue threshold is crossed within the 3 minutes).
    for name in controllers:
        assert float(results[name]["prefill_scale_events_per_hour"]) > 0, name  # type: ignore[arg-type]
