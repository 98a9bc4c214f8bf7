"""A scale-up whose replicas the reversal budget would lock in for the hour buys no surge headroom."""

from __future__ import annotations

import pytest
from kvrelay_operator.autoscaler.load import estimate_load
from kvrelay_operator.autoscaler.stabilize import up_locks_in
from kvrelay_operator.autoscaler.types import (
    DemandSample,
    Direction,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    RoleState,
    Snapshot,
)

NOW = 10_000.0


def _config() -> PolicyConfig:
    return PolicyConfig(
        ttft_slo_seconds=1.0,
        itl_slo_seconds=0.05,
        prefill=RoleLimits(max_replicas=40),
        decode=RoleLimits(max_replicas=40),
        prefill_tokens_per_second=10_000.0,
        decode_tokens_per_second=2_000.0,
        learn_capacity=False,
    )


@pytest.mark.parametrize(
    ("direction", "reversals", "locked"),
    [
        ("none", 0, False),  # a first move is no turn: a later turn down still fits the budget of 2
        ("up", 0, False),  # more of the same direction: a turn down and back up still fit
        ("down", 0, True),  # the up is itself a turn: a turn down after it would make three
        ("up", 1, True),  # one turn this hour already: a turn down and back up would make three
        ("down", 1, True),
    ],
)
def test_up_locks_in_when_a_turn_down_after_it_would_not_fit(
    direction: Direction, reversals: int, locked: bool
) -> None:
    state = RoleState(
        last_direction=direction, reversal_times=tuple(NOW - 60.0 * (i + 1) for i in range(reversals))
    )
    assert up_locks_in(state, _config(), NOW) is locked


def test_reversals_past_the_window_do_not_lock() -> None:
    config = _config()
    old = RoleState(last_direction="up", reversal_times=(NOW - config.reversal_window_seconds - 1,))
    assert not up_locks_in(old, config, NOW)


def _sized_prefill(prefill_state: RoleState) -> tuple[float, float, float]:
    """(sized, forecast, surge) for prefill after a load that rose 40% within a start a while ago."""
    config = _config()
    rate = 50_000.0
    history = tuple(
        DemandSample(at=NOW - 600.0 + 30.0 * i, prefill_tokens_per_second=rate * (1.4 if i >= 3 else 1.0),
                     decode_tokens_per_second=1_000.0)
        for i in range(20)
    )  # fmt: skip
    metrics = MetricsSample(
        observed_at=NOW,
        window_seconds=30.0,
        ttft_seconds=0.3,
        itl_seconds=0.03,
        request_rate=70.0,
        prompt_tokens_per_second=rate * 1.4,
        generation_tokens_per_second=1_000.0,
        queued_prefill_tokens=0.0,
        prefill_requests_waiting=0.0,
        decode_requests_waiting=0.0,
    )
    snapshot = Snapshot(
        metrics=metrics, prefill=RoleReplicas(current=8, ready=8), decode=RoleReplicas(current=2, ready=2)
    )
    state = PolicyState(prefill=prefill_state, demand_history=history, last_metrics_at=NOW - 30.0)
    load = estimate_load(
        snapshot, metrics, state, {"prefill": prefill_state, "decode": state.decode}, config, NOW
    )
    return load.sized["prefill"], load.forecast["prefill"], load.surge_p


def test_a_locked_in_scale_up_is_sized_for_the_load_without_surge_headroom() -> None:
    free_sized, free_forecast, surge = _sized_prefill(RoleState(last_direction="up"))
    locked_sized, locked_forecast, _ = _sized_prefill(RoleState(last_direction="down"))
    assert surge > 1.2  # the 40% rise is remembered as a surge
    assert free_sized == pytest.approx(free_forecast * surge)
    assert locked_forecast == free_forecast
    assert locked_sized == pytest.approx(locked_forecast)
