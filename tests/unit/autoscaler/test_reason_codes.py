"""Reason codes: every reason a decision gives carries a `ReasonCode`, set by the phase that had the
last word (stabilise, then bounds), and decisions_total's `reason` label is that code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kvrelay_operator.autoscaler import kopf_timer
from kvrelay_operator.autoscaler.bounds import apply_bounds, split_gpu_budget
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.stabilize import RoleNeed, stabilize
from kvrelay_operator.autoscaler.types import (
    BOUND_CODES,
    PolicyConfig,
    PolicyState,
    Proposal,
    ReasonCode,
    RoleLimits,
    RoleReplicas,
    RoleState,
    Snapshot,
)
from test_policy import INTERVAL, FakePools, make_config, metrics_for

CHART_VALUES = Path(__file__).resolve().parents[3] / "charts" / "kvrelay" / "values.yaml"
NOW = 10_000.0


def test_codes_are_the_stable_label_values() -> None:
    # Dashboards and alerts match these strings: a rename is a breaking change.
    assert {code.value for code in ReasonCode} == {
        "no_metrics",
        "load",
        "steady",
        "slo_violation",
        "replicas_loading",
        "cooldown",
        "replica_bounds",
        "ratio_bound",
        "gpu_budget",
        "requests_waiting",
        "idle",
    }
    assert str(ReasonCode.GPU_BUDGET) == "gpu_budget"  # a StrEnum: str() is the label itself


def test_chart_alert_regex_matches_exactly_the_bound_codes() -> None:
    regex = re.compile(yaml.safe_load(CHART_VALUES.read_text())["alerts"]["limitedReasonRegex"])
    assert {code for code in ReasonCode if regex.fullmatch(code.value)} == BOUND_CODES


def _need(up: int, down: int, violated: bool = False, drained: bool = True, rising: bool = False) -> RoleNeed:
    return RoleNeed(up=up, down=down, violated=violated, drained=drained, rising=rising)


# Every return of `stabilize`: (replicas, role state, need) -> the code it must carry.
STABILIZE_CASES = {
    "up for the load": (RoleReplicas(current=3, ready=3), RoleState(), _need(5, 5), ReasonCode.LOAD),
    "up for an SLO miss": (
        RoleReplicas(current=3, ready=3),
        RoleState(),
        _need(3, 3, violated=True),
        ReasonCode.SLO_VIOLATION,
    ),
    "up held by cooldown": (
        RoleReplicas(current=3, ready=3),
        RoleState(last_direction="up", last_change_at=NOW - 1, last_up_at=NOW - 1),
        _need(5, 5),
        ReasonCode.COOLDOWN,
    ),
    "down held by an SLO miss": (
        RoleReplicas(current=4, ready=3),
        RoleState(),
        _need(2, 2, violated=True),
        ReasonCode.SLO_VIOLATION,
    ),
    "down held by loading replicas": (
        RoleReplicas(current=4, ready=3),
        RoleState(),
        _need(2, 2),
        ReasonCode.REPLICAS_LOADING,
    ),
    "down held by the scale-down cooldown": (
        RoleReplicas(current=4, ready=4),
        RoleState(last_direction="up", last_change_at=NOW - 60, last_up_at=NOW - 60),
        _need(3, 3, drained=False),
        ReasonCode.COOLDOWN,
    ),
    "down once a backlog drained": (
        RoleReplicas(current=8, ready=8),
        RoleState(last_direction="up", last_change_at=NOW - 60, last_up_at=NOW - 60, steady_need_at_up=3),
        _need(3, 3),
        ReasonCode.LOAD,
    ),
    "down held by rising demand": (
        RoleReplicas(current=4, ready=4),
        RoleState(),
        _need(2, 2, rising=True),
        ReasonCode.COOLDOWN,
    ),
    "down held between steps": (
        RoleReplicas(current=4, ready=4),
        RoleState(last_direction="down", last_change_at=NOW - 10),
        _need(2, 2),
        ReasonCode.COOLDOWN,
    ),
    "down to the window's peak": (
        RoleReplicas(current=4, ready=4),
        RoleState(),
        _need(2, 2),
        ReasonCode.LOAD,
    ),
    "steady": (RoleReplicas(current=4, ready=4), RoleState(), _need(4, 4), ReasonCode.STEADY),
}


@pytest.mark.parametrize("case", STABILIZE_CASES)
def test_every_stabilise_outcome_carries_its_code(case: str) -> None:
    replicas, role_state, need, code = STABILIZE_CASES[case]
    proposal = stabilize("prefill", replicas, role_state, make_config(), NOW, need)
    assert proposal.code is code, proposal.reason


def _proposed(prefill: int, decode: int) -> dict[str, Proposal]:
    return {
        "prefill": Proposal(replicas=prefill, reason="up: load", code=ReasonCode.LOAD),
        "decode": Proposal(replicas=decode, reason="steady: load", code=ReasonCode.STEADY),
    }


def test_bounds_set_their_code_and_append_their_note() -> None:
    clamp = make_config(prefill=RoleLimits(min_replicas=1, max_replicas=4))
    bounded, limited = apply_bounds(_proposed(6, 3), {"prefill": 6, "decode": 3}, clamp)  # type: ignore[arg-type]
    assert limited and bounded["prefill"].replicas == 4
    assert bounded["prefill"].code is ReasonCode.REPLICA_BOUNDS
    assert bounded["prefill"].reason == "up: load, clamped to [1, 4]"
    assert bounded["decode"] == _proposed(6, 3)["decode"]  # untouched role keeps its code

    ratio = make_config(ratio_max=2.0)
    bounded, _ = apply_bounds(_proposed(6, 1), {"prefill": 6, "decode": 1}, ratio)  # type: ignore[arg-type]
    assert bounded["decode"].replicas == 3 and bounded["decode"].code is ReasonCode.RATIO_BOUND
    assert bounded["decode"].reason == "steady: load, ratio max 2.0"
    assert bounded["prefill"].code is ReasonCode.LOAD  # the long side did not move

    budget = make_config(gpu_budget=6)
    bounded, limited = apply_bounds(_proposed(6, 3), {"prefill": 6, "decode": 3}, budget)  # type: ignore[arg-type]
    assert limited and sum(p.replicas for p in bounded.values()) == 6
    assert {p.code for p in bounded.values()} == {ReasonCode.GPU_BUDGET}
    assert bounded["prefill"].reason.endswith(", GPU budget 6")


def test_the_last_bound_that_moved_a_role_names_it() -> None:
    config = make_config(prefill=RoleLimits(min_replicas=1, max_replicas=8), gpu_budget=6)
    bounded, _ = apply_bounds(_proposed(10, 3), {"prefill": 10, "decode": 3}, config)  # type: ignore[arg-type]
    assert bounded["prefill"].reason == "up: load, clamped to [1, 8], GPU budget 6"
    assert bounded["prefill"].code is ReasonCode.GPU_BUDGET


def test_both_ratio_bounds_can_move_one_pool_and_both_notes_stay() -> None:
    config = make_config(ratio_min=1.5, ratio_max=1.5)
    bounded, _ = apply_bounds(_proposed(4, 2), {"prefill": 4, "decode": 2}, config)  # type: ignore[arg-type]
    assert (bounded["prefill"].replicas, bounded["decode"].replicas) == (5, 3)
    assert bounded["decode"].reason == "steady: load, ratio max 1.5"
    assert bounded["prefill"].reason == "up: load, ratio min 1.5"
    assert {p.code for p in bounded.values()} == {ReasonCode.RATIO_BOUND}


def test_gpu_budget_split_fills_the_least_met_need_first() -> None:
    config = make_config(gpu_budget=5)
    split = split_gpu_budget({"prefill": 6, "decode": 2}, {"prefill": 6, "decode": 2}, config)  # type: ignore[arg-type]
    assert split == {"prefill": 3, "decode": 2}  # ties go to decode (by name)


def test_a_hold_for_missing_metrics_is_no_metrics() -> None:
    snapshot = Snapshot(
        metrics=None, prefill=RoleReplicas(current=2, ready=2), decode=RoleReplicas(current=2, ready=2)
    )
    decision, _ = decide(snapshot, PolicyState(), make_config(), NOW)
    assert decision.hold
    assert {decision.role(r).code for r in ("prefill", "decode")} == {ReasonCode.NO_METRICS}  # type: ignore[arg-type]
    stale = snapshot.model_copy(update={"metrics": metrics_for(NOW - 600, 10.0)})
    decision, _ = decide(stale, PolicyState(), make_config(), NOW)
    assert decision.prefill.code is ReasonCode.NO_METRICS and decision.prefill.reason.startswith(
        "hold: metrics stale"
    )


def _scenario_decisions(config: PolicyConfig) -> list:
    """A burst, SLO misses, a slow drain, a gap in metrics: most paths through `decide`."""
    pools = FakePools(prefill=2, decode=2, load_steps=2, config=config)
    for rate in [10.0] * 3 + [120.0] * 6 + [None] * 2 + [60.0] * 4 + [5.0] * 25:
        pools.tick(rate)
    for _ in range(3):
        pools.tick(
            10.0,
            ttft_seconds=5.0,
            itl_seconds=1.0,
            queued_prefill_tokens=5_000.0,
            decode_requests_waiting=4.0,
        )
    return pools.decisions


@pytest.mark.parametrize(
    ("config", "bound"),
    [
        (make_config(), ReasonCode.REPLICA_BOUNDS),  # the idle tail would go below min_replicas
        (make_config(ratio_min=2.0, ratio_max=3.0), ReasonCode.RATIO_BOUND),
        (make_config(gpu_budget=10), ReasonCode.GPU_BUDGET),
    ],
    ids=["replica_bounds", "ratio", "gpu_budget"],
)
def test_every_decision_carries_a_code_its_label_and_text_agree_on(
    config: PolicyConfig, bound: ReasonCode
) -> None:
    decisions = _scenario_decisions(config)
    for decision in decisions:
        labels = kopf_timer.decision_labels("m", decision)
        for (model, role, direction, label), role_name in zip(labels, ("prefill", "decode"), strict=True):
            role_decision = decision.role(role_name)  # type: ignore[arg-type]
            assert (model, role, direction) == ("m", role_name, role_decision.direction)
            assert isinstance(role_decision.code, ReasonCode)
            assert label == role_decision.code.value  # the metric label is the code, never parsed text
    seen = {decision.role(r).code for decision in decisions for r in ("prefill", "decode")}  # type: ignore[arg-type]
    assert {ReasonCode.LOAD, ReasonCode.STEADY, ReasonCode.COOLDOWN, ReasonCode.SLO_VIOLATION} <= seen
    assert {ReasonCode.NO_METRICS, bound} <= seen
    assert decisions[0].at == INTERVAL


def test_codes_round_trip_through_the_decision_log_json() -> None:
    decision = _scenario_decisions(make_config(gpu_budget=10))[-1]
    restored = type(decision).model_validate_json(decision.model_dump_json())
    assert restored == decision and isinstance(restored.prefill.code, ReasonCode)
    assert '"code":"' in decision.model_dump_json()
