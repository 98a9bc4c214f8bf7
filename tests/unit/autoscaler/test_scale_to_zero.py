"""Scale to zero (minReplicas 0) in the pure policy: up from zero on requests held at the router, down to
zero only after a whole scale-down window without load, and never a hold for want of worker series."""

from __future__ import annotations

import pytest
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.prometheus import QuerySpec, build_queries, to_sample
from kvrelay_operator.autoscaler.scale_to_zero import idle_seconds, load_now, with_zero_pools
from kvrelay_operator.autoscaler.types import (
    Decision,
    DemandSample,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    ReasonCode,
    RoleLimits,
    RoleReplicas,
    Snapshot,
)
from test_policy import INTERVAL, make_config, metrics_for

WINDOW = 6 * INTERVAL


def zero_config(**overrides: object) -> PolicyConfig:
    """Both roles may sleep; the scale-down window is six decisions, its cooldown two."""
    base: dict[str, object] = {
        "prefill": RoleLimits(min_replicas=0, max_replicas=4),
        "decode": RoleLimits(min_replicas=0, max_replicas=4),
        "scale_down_window_seconds": WINDOW,
        "scale_down_cooldown_seconds": 2 * INTERVAL,
    }
    base.update(overrides)
    return make_config(**base)


def router_only(now: float, prefill_held: float = 0.0, decode_held: float = 0.0) -> MetricsSample:
    """What Prometheus has with both pools at zero: the router's series, no worker's."""
    return MetricsSample(
        observed_at=now,
        window_seconds=INTERVAL,
        request_rate=0.0,
        prefill_requests_waiting_for_replicas=prefill_held,
        decode_requests_waiting_for_replicas=decode_held,
    )


def idle(now: float) -> MetricsSample:
    """Both pools up and idle: every rate and gauge 0."""
    return metrics_for(now, 0.0, decode_requests_running=0.0)


def snap(metrics: MetricsSample | None, prefill: int, decode: int) -> Snapshot:
    return Snapshot(
        metrics=metrics,
        prefill=RoleReplicas(current=prefill, ready=prefill),
        decode=RoleReplicas(current=decode, ready=decode),
    )


def test_a_pool_at_zero_reads_its_missing_rate_as_zero_but_a_running_pool_does_not() -> None:
    metrics = router_only(100.0)
    filled = with_zero_pools(snap(metrics, 0, 0)).metrics
    assert filled is not None
    assert (filled.prompt_tokens_per_second, filled.generation_tokens_per_second) == (0.0, 0.0)
    # Decode has a ready replica whose series are missing: that is missing data, the policy holds.
    half = with_zero_pools(snap(metrics, 0, 1))
    assert half.metrics is not None and half.metrics.generation_tokens_per_second is None
    decision, _ = decide(half, PolicyState(), zero_config(), 100.0)
    assert decision.hold and "generation_tokens_per_second" in decision.reason
    assert with_zero_pools(snap(None, 0, 0)).metrics is None


def test_both_pools_at_zero_come_up_together_for_a_request_held_at_the_router() -> None:
    decision, state = decide(snap(router_only(100.0, 1, 1), 0, 0), PolicyState(), zero_config(), 100.0)
    assert not decision.hold
    for role in ("prefill", "decode"):
        d = decision.role(role)  # type: ignore[arg-type]
        assert (d.previous, d.replicas, d.direction, d.code) == (0, 1, "up", ReasonCode.REQUESTS_WAITING)
        assert "1 request(s) wait at the router for a prefill and decode replica" in d.reason
    assert state.decode.last_direction == "up"
    # While they start (current 1, ready 0) nothing moves: no series yet, no second replica, no hold.
    starting = Snapshot(
        metrics=router_only(130.0, 1, 1),
        prefill=RoleReplicas(current=1, ready=0),
        decode=RoleReplicas(current=1, ready=0),
    )
    decision, _ = decide(starting, state, zero_config(), 130.0)
    assert not decision.hold and (decision.prefill.replicas, decision.decode.replicas) == (1, 1)


def test_the_idle_pools_stay_at_zero_with_their_reason() -> None:
    decision, _ = decide(snap(router_only(100.0), 0, 0), PolicyState(), zero_config(), 100.0)
    assert not decision.hold
    for role in ("prefill", "decode"):
        d = decision.role(role)  # type: ignore[arg-type]
        assert (d.replicas, d.direction, d.code) == (0, "none", ReasonCode.IDLE)
        assert "scaled to zero" in d.reason


@pytest.mark.parametrize("asleep", ["prefill", "decode"])
def test_one_role_at_zero_wakes_for_requests_held_for_it(asleep: str) -> None:
    other = "decode" if asleep == "prefill" else "prefill"
    config = zero_config(**{other: RoleLimits(min_replicas=1, max_replicas=4)})
    held = {f"{asleep}_held": 2.0}
    metrics = router_only(100.0, **held)  # type: ignore[arg-type]
    # The other pool is up and idle: its worker series are there.
    metrics = metrics.model_copy(
        update={"prompt_tokens_per_second": 0.0, "generation_tokens_per_second": 0.0}
    )
    counts = {asleep: 0, other: 1}
    decision, _ = decide(snap(metrics, counts["prefill"], counts["decode"]), PolicyState(), config, 100.0)
    assert decision.role(asleep).replicas == 1 and decision.role(asleep).code == ReasonCode.REQUESTS_WAITING  # type: ignore[arg-type]
    assert f"2 request(s) wait at the router for a {asleep} replica" in decision.role(asleep).reason  # type: ignore[arg-type]
    assert decision.role(other).replicas == 1  # type: ignore[arg-type]


def test_a_role_at_zero_comes_up_when_the_other_role_has_load() -> None:
    # Decode sleeps and prefill is busy (echo-only requests need no decode, say): a request needs both.
    config = zero_config(prefill=RoleLimits(min_replicas=1, max_replicas=4))
    metrics = metrics_for(100.0, 1.0, generation_tokens_per_second=None)
    decision, _ = decide(snap(metrics, 1, 0), PolicyState(), config, 100.0)
    assert decision.decode.replicas == 1 and decision.decode.code == ReasonCode.REQUESTS_WAITING
    assert "prompt tokens/s" in decision.decode.reason


def test_waking_respects_the_gpu_budget_and_max_replicas() -> None:
    config = zero_config(
        prefill=RoleLimits(min_replicas=0, max_replicas=1, gpus_per_replica=2),
        decode=RoleLimits(min_replicas=0, max_replicas=1, gpus_per_replica=1),
        gpu_budget=3,
    )
    decision, _ = decide(snap(router_only(100.0, 5, 5), 0, 0), PolicyState(), config, 100.0)
    assert (decision.prefill.replicas, decision.decode.replicas) == (1, 1)  # 3 GPUs: fits exactly
    assert not decision.limited


class Clock:
    """Decisions every INTERVAL on pools that follow them at once (each replica ready when asked)."""

    def __init__(self, config: PolicyConfig, prefill: int, decode: int) -> None:
        self.config, self.state, self.now = config, PolicyState(), 0.0
        self.replicas = {"prefill": prefill, "decode": decode}

    def tick(self, make: object) -> Decision:
        self.now += INTERVAL
        metrics = make(self.now)  # type: ignore[operator]
        decision, self.state = decide(
            snap(metrics, self.replicas["prefill"], self.replicas["decode"]),
            self.state,
            self.config,
            self.now,
        )
        self.replicas = {role: decision.role(role).replicas for role in ("prefill", "decode")}  # type: ignore[arg-type]
        return decision


def test_down_to_zero_only_after_a_whole_window_without_load() -> None:
    clock = Clock(zero_config(), 1, 1)
    for _ in range(3):
        clock.tick(lambda now: metrics_for(now, 0.5))  # light load: one replica each
    assert clock.replicas == {"prefill": 1, "decode": 1}
    went_at = None
    for _ in range(12):
        decision = clock.tick(idle)
        if clock.replicas == {"prefill": 0, "decode": 0}:
            went_at = clock.now
            assert decision.decode.code == ReasonCode.IDLE and "down to zero" in decision.decode.reason
            break
    assert went_at is not None, clock.state
    last_busy = 3 * INTERVAL
    assert went_at - last_busy >= WINDOW  # the whole window idle, not less
    assert went_at - last_busy <= WINDOW + INTERVAL


def test_a_role_idle_alone_waits_for_the_whole_model_to_be_idle() -> None:
    # Prefill sees nothing (a long stream's prompt was long ago) while decode still generates: the
    # stream's next turn would need prefill, so prefill waits for a window after decode went quiet.
    clock = Clock(zero_config(), 1, 1)
    for _ in range(8):
        clock.tick(lambda now: metrics_for(now, 0.0, generation_tokens_per_second=50.0))
    assert clock.replicas["prefill"] == 1
    decode_quiet_at = clock.now
    reasons = []
    while clock.replicas["prefill"] == 1:
        assert clock.now < decode_quiet_at + 3 * WINDOW, reasons
        reasons.append(clock.tick(idle).prefill.reason)
    assert clock.now - decode_quiet_at >= WINDOW
    assert any("without load" in r for r in reasons), reasons


def test_load_inside_the_window_starts_it_again_and_running_requests_keep_the_last_replica() -> None:
    clock = Clock(zero_config(), 1, 1)
    for _ in range(5):
        clock.tick(idle)
    clock.tick(lambda now: metrics_for(now, 0.2))  # a request comes and goes
    for _ in range(5):
        assert clock.tick(idle).decode.replicas == 1  # idle again, but not for a window yet
    # A stream that runs but made no token in the window (a stalled or slow one): nothing goes while it
    # does, also once the rates have been 0 for longer than a window.
    reasons = []
    for _ in range(10):
        decision = clock.tick(
            lambda now: metrics_for(now, 0.0, decode_requests_running=1.0, generation_tokens_per_second=0.0)
        )
        assert decision.decode.replicas == 1 and decision.prefill.replicas == 1
        reasons.append(decision.decode.reason)
    assert "hold: the last replica stays while 1 requests running" in reasons[-1], reasons
    assert clock.tick(idle).decode.replicas == 1  # the window starts after the stream


def test_a_role_with_min_one_never_gets_the_zero_rules() -> None:
    clock = Clock(make_config(), 1, 1)
    for _ in range(12):
        decision = clock.tick(idle)
    assert clock.replicas == {"prefill": 1, "decode": 1}
    assert decision.decode.code != ReasonCode.IDLE and "zero" not in decision.decode.reason


def test_load_now_and_idle_seconds() -> None:
    assert load_now(idle(0.0)) is None
    assert load_now(metrics_for(0.0, 0.0, queued_prefill_tokens=512.0)) == "512 queued prompt tokens"
    history = (DemandSample(at=10, prefill_tokens_per_second=5, decode_tokens_per_second=0),
               DemandSample(at=40, prefill_tokens_per_second=0, decode_tokens_per_second=0))  # fmt: skip
    assert idle_seconds(history, None, metrics_since=0.0, now=70.0) == 60.0
    assert idle_seconds(history[1:], None, metrics_since=20.0, now=70.0) == 50.0  # no evidence before 20
    assert idle_seconds(history, 55.0, metrics_since=0.0, now=70.0) == 15.0  # a request ran until 55


def test_the_reader_sees_the_router_alone_as_fresh_and_reads_held_requests() -> None:
    queries = build_queries(QuerySpec(model="m", window_seconds=30))
    assert "kvrelay_router_requests_waiting_for_replicas" in queries["observed_at"]
    assert "kvrelay_requests_running" in queries["observed_at"]
    held = queries["decode_requests_waiting_for_replicas"]
    assert held.startswith("sum(max_over_time(kvrelay_router_requests_waiting_for_replicas{")
    assert 'role="decode"' in held and "[30s]" in held
    sample = to_sample({"observed_at": 1700.0, "decode_requests_waiting_for_replicas": 2.0}, 30)
    assert sample is not None and sample.waiting_for_replicas("decode") == 2.0
    assert sample.waiting_for_replicas("prefill") == 0.0


def test_sleep_and_wake_cycles_are_paced_by_the_idle_window_not_the_reversal_budget() -> None:
    # Traffic a few times an hour: the model sleeps after each burst's idle window, and the trips to
    # and from zero neither spend the reversal budget nor damp the next sleep.
    config = zero_config()
    clock = Clock(config, 1, 1)
    for _ in range(3):
        while clock.replicas["decode"]:
            clock.tick(idle)
        slept_at = clock.now
        assert clock.tick(lambda now: router_only(now, 1, 1)).decode.replicas == 1
        clock.tick(lambda now: metrics_for(now, 0.2))
        while clock.replicas["decode"]:
            decision = clock.tick(idle)
        assert decision.decode.code == ReasonCode.IDLE
        assert clock.now - slept_at <= 3 * INTERVAL + WINDOW + 2 * INTERVAL  # one idle window, no more
        assert clock.state.decode.reversal_times == () and clock.state.decode.damping == 1.0
