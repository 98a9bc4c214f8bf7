"""The policy's memory through status.autoscaler.state: round trip, restore after a restart, and
that a restored operator decides as the one before it would have. Pure, no cluster."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from kvrelay_operator import api
from kvrelay_operator.autoscaler import kopf_timer, persist
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.types import (
    Decision,
    DemandSample,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    RoleState,
    Snapshot,
)

INTERVAL = 30.0
T0 = 1_767_225_600.123456  # wall-clock unix seconds with a fraction, as time.time() gives
PROMPT, OUTPUT = 1_000.0, 200.0


def make_config() -> PolicyConfig:
    return PolicyConfig(
        ttft_slo_seconds=1.0,
        itl_slo_seconds=0.05,
        prefill=RoleLimits(min_replicas=1, max_replicas=40),
        decode=RoleLimits(min_replicas=1, max_replicas=40),
        interval_seconds=INTERVAL,
        scale_down_window_seconds=6 * INTERVAL,
        scale_down_cooldown_seconds=120.0,
        prefill_tokens_per_second=10_000.0,
        decode_tokens_per_second=2_000.0,
    )


def metrics(now: float, rate: float) -> MetricsSample:
    """A pool at `rate` requests/s whose replicas really do 7k prompt and 1.7k generated tokens/s."""
    return MetricsSample(
        observed_at=now - 3.0,
        window_seconds=INTERVAL,
        ttft_seconds=0.3,
        itl_seconds=0.035,
        request_rate=rate,
        prompt_tokens_per_second=rate * PROMPT,
        generation_tokens_per_second=rate * OUTPUT * 1.013,
        queued_prefill_tokens=1_234.5,
        prefill_requests_waiting=0.0,
        decode_requests_waiting=0.0,
        prefill_busy_seconds_per_second=rate * PROMPT / 7_000.0,
    )


class Pools:
    """decide() in a loop with its replicas applied at once (ready a decision later)."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.state = PolicyState()
        self.now = T0
        self.current = {"prefill": 2, "decode": 2}
        self.ready = dict(self.current)

    def snapshot(self, rate: float, at: float | None = None) -> Snapshot:
        return Snapshot(
            metrics=metrics(self.now if at is None else at, rate),
            prefill=RoleReplicas(current=self.current["prefill"], ready=self.ready["prefill"]),
            decode=RoleReplicas(current=self.current["decode"], ready=self.ready["decode"]),
        )

    def tick(self, rate: float) -> Decision:
        self.now += INTERVAL + 0.0137  # timer ticks never land on whole seconds
        self.ready = dict(self.current)
        decision, self.state = decide(self.snapshot(rate), self.state, self.config, self.now)
        self.current = {role: decision.role(role).replicas for role in ("prefill", "decode")}
        return decision


def lived(rates: list[float]) -> Pools:
    pools = Pools(make_config())
    for rate in rates:
        pools.tick(rate)
    return pools


# Steady, a dip that takes prefill down, the load back (a regretted scale-down: damping doubles).
LOAD = [60.0] * 12 + [50.0] * 10 + [60.0] * 4


def flatten(state: PolicyState) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(f"{prefix}[{i}]", item)
        else:
            out[prefix] = value

    walk("", state.model_dump())
    return out


def through_status(state: PolicyState) -> api.AutoscalerState:
    """to_status, then JSON as the API server stores it, then read back."""
    wire = json.loads(json.dumps(persist.to_status(state).model_dump(by_alias=True, mode="json")))
    return api.AutoscalerState.model_validate(wire)


def test_a_lived_state_has_everything_worth_persisting() -> None:
    state = lived(LOAD).state
    for role in ("prefill", "decode"):
        learned = state.role(role).capacity_tokens_per_second
        assert learned is not None and learned not in (10_000.0, 2_000.0)
        assert state.role(role).last_up_at is not None
    prefill = state.prefill
    assert prefill.num_reversals == len(prefill.reversal_times) == 2
    assert prefill.damping > 1.0 and prefill.last_reversal_at is not None and state.last_load_at is not None
    assert len(state.demand_history) == len(LOAD) and state.mean_output_tokens is not None
    assert state.metrics_since is not None and state.last_queued_prefill_tokens is not None


def test_state_round_trips_through_status_for_every_persisted_part() -> None:
    state = lived(LOAD).state
    back = persist.from_status(through_status(state))
    assert back.metrics_since is None  # never written: a restart waits for a fresh window
    expected, got = flatten(state.model_copy(update={"metrics_since": None})), flatten(back)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, float) and key.endswith(("_at", ".at")):
            assert got[key] == pytest.approx(value, abs=1e-3), key  # times: to the millisecond
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5), key  # values: six significant digits
        else:
            assert got[key] == value, key
    # Rounded once, a state is a fixed point: what a restarted operator writes back is what it read.
    assert persist.from_status(through_status(back)) == back
    assert through_status(back) == through_status(state)


def test_restored_state_decides_as_the_state_it_was_written_from() -> None:
    pools = lived(LOAD)
    saved = through_status(pools.state)
    now = pools.now + INTERVAL  # the first decision of a new operator, one interval on
    snapshot = pools.snapshot(60.0)
    restored = persist.restore(saved, now, pools.config)
    # What it read is what was written (the previous observation is fresh, so nothing is dropped).
    assert restored == persist.from_status(saved)
    original, _ = decide(snapshot, pools.state, pools.config, now)
    again, _ = decide(snapshot, restored, pools.config, now)
    assert again.model_dump(exclude={"inputs"}) == original.model_dump(exclude={"inputs"})
    assert again.inputs.keys() == original.inputs.keys()
    for key, value in original.inputs.items():
        assert again.inputs[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # It did not fall back to the profile: a fresh state decides from the seeds.
    fresh, _ = decide(snapshot, PolicyState(), pools.config, now)
    learned = pools.state.prefill.capacity_tokens_per_second
    assert again.inputs["prefill_capacity_tokens_per_second"] == pytest.approx(learned, rel=0.31)
    assert fresh.inputs["prefill_capacity_tokens_per_second"] != pytest.approx(learned, rel=0.05)


def test_restart_waits_for_a_fresh_window_before_scaling_down() -> None:
    pools = lived([60.0] * 20)
    for _ in range(20):  # the load falls; stop where the next decision would take prefill down
        now = pools.now + INTERVAL + 0.0137
        continuing, _ = decide(pools.snapshot(15.0, at=now), pools.state, pools.config, now)
        if continuing.prefill.direction == "down":
            break
        pools.tick(15.0)
    # The running operator, with its unbroken run of metrics, would go down now ...
    assert continuing.prefill.direction == "down", continuing.prefill.reason
    assert pools.state.metrics_since is not None
    saved = through_status(pools.state)
    # ... a restarted one holds until a whole window of its own metrics is seen.
    pools.state = persist.restore(saved, now - INTERVAL, pools.config)
    held = [pools.tick(15.0) for _ in range(int(pools.config.scale_down_window_seconds // INTERVAL))]
    assert all(d.prefill.direction == "none" for d in held), [d.prefill.reason for d in held]
    assert any(pools.tick(15.0).prefill.direction == "down" for _ in range(3))


def test_restore_keeps_learned_state_but_not_an_old_previous_observation() -> None:
    pools = lived(LOAD)
    saved = through_status(pools.state)
    late = pools.now + pools.config.max_metric_age_seconds + 1.0
    restored = persist.restore(saved, late, pools.config)
    assert restored.last_metrics_at is None and restored.last_queued_prefill_tokens is None
    assert restored.last_waiting_requests is None and restored.last_prefill_ready is None
    # Learned, and the times cooldowns and damping count from, survive any outage.
    kept = persist.from_status(saved)
    assert restored.prefill == kept.prefill and restored.decode == kept.decode
    assert restored.demand_history == kept.demand_history
    assert restored.mean_output_tokens == kept.mean_output_tokens
    # A day later the policy's own clocks have let the history and damping go.
    day = pools.now + 86_400
    decision, after = decide(pools.snapshot(60.0, at=day), restored, pools.config, day)
    assert not decision.hold and len(after.demand_history) == 1
    assert after.prefill.damping == pytest.approx(kept.prefill.damping / 2)  # halves per decay period


def test_history_and_reversals_are_capped_to_the_newest() -> None:
    history = tuple(
        DemandSample(at=T0 + i * 5.0, prefill_tokens_per_second=1000.0 + i, decode_tokens_per_second=200.0)
        for i in range(api.MAX_DEMAND_SAMPLES + 50)
    )
    turns = RoleState(reversal_times=tuple(T0 + i for i in range(api.MAX_REVERSALS + 6)))
    saved = persist.to_status(PolicyState(demand_history=history, decode=turns))
    assert saved.decode.reversal_times[0] == pytest.approx(T0 + 6, abs=1e-3)
    assert len(saved.decode.reversal_times) == api.MAX_REVERSALS
    assert saved.demand_history is not None
    assert len(saved.demand_history.offsets_seconds) == api.MAX_DEMAND_SAMPLES
    back = persist.from_status(saved).demand_history
    assert len(back) == api.MAX_DEMAND_SAMPLES and back[0].prefill_tokens_per_second == 1050.0
    assert back[-1].at == pytest.approx(history[-1].at, abs=1e-3)


def test_columns_of_unequal_length_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="must have the same length"):
        api.DemandHistoryState(
            start=T0,
            offsets_seconds=[0.0, 30.0],
            prefill_tokens_per_second=[1.0],
            decode_tokens_per_second=[1.0],
        )


def test_status_patch_carries_the_state_with_nulls_for_what_is_unset() -> None:
    pools = lived(LOAD[:3])
    decision = pools.tick(20.0)
    patch = kopf_timer.decision_status_patch(decision, "auto", "2026-01-01T00:00:00Z", state=pools.state)
    state = patch["autoscaler"]["state"]
    # A merge patch keeps the fields it does not name: unset ones must be sent as null.
    assert state["prefill"]["steadyNeedAtUp"] is None or isinstance(state["prefill"]["steadyNeedAtUp"], int)
    assert "lastReversalAt" in state["prefill"] and state["prefill"]["lastReversalAt"] is None
    assert api.AutoscalerStatus.model_validate(patch["autoscaler"]).state == persist.to_status(pools.state)
    assert len(json.dumps(state)) < 2_000  # compact: a few numbers per decision of history
    assert "state" not in kopf_timer.decision_status_patch(decision, "auto", "t")["autoscaler"]


def test_timer_reads_the_state_apart_so_a_bad_one_only_costs_the_restore() -> None:
    pools = lived(LOAD)
    good = persist.to_status(pools.state).model_dump(by_alias=True, mode="json")
    status = {"phase": "Ready", "autoscaler": {"reason": "x", "state": good}}
    raw, saved = kopf_timer._split_saved_state(status)  # type: ignore[arg-type]
    assert raw == {"phase": "Ready", "autoscaler": {"reason": "x"}} and saved == good
    assert status["autoscaler"]["state"] == good  # the body kopf holds is left alone
    config, now = pools.config, pools.now + 1.0
    restored = kopf_timer._restored_state(saved, now, config, "ns/dm")
    assert restored == persist.restore(api.AutoscalerState.model_validate(good), now, config)
    bad = {**good, "prefill": {"damping": 0.5}}
    assert kopf_timer._restored_state(bad, now, config, "ns/dm") == PolicyState()
    assert kopf_timer._restored_state(None, now, config, "ns/dm") == PolicyState()
    assert math.isinf(kopf_timer._Runtime().last_decision_at) and kopf_timer._Runtime().state is None
