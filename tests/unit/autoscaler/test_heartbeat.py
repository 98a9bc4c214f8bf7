"""should_write: status on a material change, else a heartbeat; and what that saves over an hour."""

from __future__ import annotations

import pytest
from kvrelay_operator.autoscaler.heartbeat import HEARTBEAT_SECONDS, Written, should_write, summarize
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.types import (
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    Snapshot,
)

OUTCOME = ("auto", False, False, 3, "steady", "up", 1.0, 0, 2, "steady", "none", 1.0, 0)


LEARNED = (7_000.0, 1_500.0, 200.0)  # prefill and decode capacity, mean output tokens
UNLEARNED = (None, None, None)


def written(
    at: float, outcome: tuple[object, ...] = OUTCOME, learned: tuple[float | None, ...] = LEARNED
) -> Written:
    return Written(at=at, outcome=outcome, learned=learned)


def test_the_first_decision_is_always_written() -> None:
    assert should_write(None, written(0.0))


def test_nothing_changed_waits_for_the_heartbeat() -> None:
    last = written(1_000.0)
    assert not should_write(last, written(1_030.0))
    assert not should_write(last, written(1_000.0 + HEARTBEAT_SECONDS - 0.1))
    assert should_write(last, written(1_000.0 + HEARTBEAT_SECONDS))
    assert should_write(last, written(1_000.0 + 90.0), heartbeat_seconds=60.0)


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, "advisory"),  # mode: desiredReplicas starts or stops being written
        (1, True),  # hold
        (2, True),  # a bound limited the need
        (3, 4),  # prefill replicas
        (4, "cooldown"),  # prefill reason code
        (5, "down"),  # prefill last move
        (6, 2.0),  # prefill damping doubled
        (7, 1),  # a reversal
        (8, 1),  # decode replicas
        (9, "slo_violation"),  # decode reason code
        (11, 0.5 + 1.0),  # decode damping
        (12, 3),  # decode reversals
    ],
)
def test_any_material_change_is_written_at_once(index: int, value: object) -> None:
    changed = (*OUTCOME[:index], value, *OUTCOME[index + 1 :])
    assert should_write(written(1_000.0), written(1_005.0, outcome=changed))


def test_learned_values_are_written_once_they_move_past_the_tolerance() -> None:
    last = written(1_000.0)
    assert not should_write(last, written(1_030.0, learned=(7_300.0, 1_500.0, 200.0)))  # +4.3%
    assert should_write(last, written(1_030.0, learned=(7_400.0, 1_500.0, 200.0)))  # +5.7%
    assert should_write(last, written(1_030.0, learned=(7_000.0, 1_400.0, 200.0)))  # decode -6.7%
    assert should_write(last, written(1_030.0, learned=(7_000.0, 1_500.0, 215.0)))  # mean output +7.5%
    # Compared with what was written, not the previous decision: slow drift adds up.
    assert should_write(last, written(1_060.0, learned=(7_000.0 * 1.03 * 1.03, 1_500.0, 200.0)))
    # Learned for the first time (the profile seed was in use).
    assert should_write(written(1_000.0, learned=UNLEARNED), last)
    assert not should_write(written(1_000.0, learned=UNLEARNED), written(1_030.0, learned=UNLEARNED))


def test_summary_holds_what_status_says_and_the_learned_state() -> None:
    config = PolicyConfig(ttft_slo_seconds=1.0, itl_slo_seconds=0.05, prefill=RoleLimits(max_replicas=9))
    two = RoleReplicas(current=2, ready=2)
    sample = MetricsSample(
        observed_at=99.0, prompt_tokens_per_second=50_000.0, generation_tokens_per_second=3_000.0
    )
    decision, state = decide(Snapshot(metrics=sample, prefill=two, decode=two), PolicyState(), config, 100.0)
    summary = summarize(decision, state, "auto")
    assert summary.at == 100.0
    prefill = decision.prefill
    assert summary.outcome[:6] == ("auto", False, False, prefill.replicas, prefill.code.value, "up")
    learned = (state.prefill.capacity_tokens_per_second, state.decode.capacity_tokens_per_second)
    assert summary.learned == (*learned, state.mean_output_tokens)


def test_an_hour_of_steady_load_writes_a_heartbeat_not_every_decision() -> None:
    config = PolicyConfig(ttft_slo_seconds=1.0, itl_slo_seconds=0.05, interval_seconds=30.0)
    state, last, writes, now = PolicyState(), None, 0, 1_767_225_600.0
    current = {"prefill": 1, "decode": 1}
    for step in range(120):  # one hour at the default 30 s interval
        now += 30.0
        wobble = 1.0 + 0.02 * ((step % 5) - 2)  # +-4% noise on the load, nothing that matters
        sample = MetricsSample(
            observed_at=now - 5.0,
            request_rate=20.0 * wobble,
            ttft_seconds=0.3,
            itl_seconds=0.03,
            prompt_tokens_per_second=20_000.0 * wobble,
            generation_tokens_per_second=3_000.0 * wobble,
            queued_prefill_tokens=0.0,
            prefill_busy_seconds_per_second=2.0 * wobble,
        )
        snapshot = Snapshot(
            metrics=sample,
            prefill=RoleReplicas(current=current["prefill"], ready=current["prefill"]),
            decode=RoleReplicas(current=current["decode"], ready=current["decode"]),
        )
        decision, state = decide(snapshot, state, config, now)
        summary = summarize(decision, state, "auto", status_desired=current)  # what the reconciler applied
        current = {role: decision.role(role).replicas for role in current}
        if should_write(last, summary):
            writes, last = writes + 1, summary
    # The first decisions move replicas and learn capacity; after that, 12 heartbeats an hour.
    assert writes <= 24, writes  # of 120 decisions
    assert writes >= 3600 / HEARTBEAT_SECONDS - 1


def test_auto_mode_writes_at_once_when_status_does_not_show_the_replicas_decided() -> None:
    config = PolicyConfig(ttft_slo_seconds=1.0, itl_slo_seconds=0.05)
    two = RoleReplicas(current=2, ready=2)
    sample = MetricsSample(
        observed_at=99.0, prompt_tokens_per_second=50_000.0, generation_tokens_per_second=3_000.0
    )
    decision, state = decide(Snapshot(metrics=sample, prefill=two, decode=two), PolicyState(), config, 100.0)
    decided = {"prefill": decision.prefill.replicas, "decode": decision.decode.replicas}
    last = summarize(decision, state, "auto", decided)
    assert last.applied
    # The same decision again, but the write that carried it was lost: status still says 2.
    lost = summarize(decision.model_copy(update={"at": 130.0}), state, "auto", {"prefill": 2, "decode": 2})
    assert not lost.applied and should_write(last, lost)
    # Shown, or not this process's to write (advisory; a hold writes no desiredReplicas): no hurry.
    shown = summarize(decision.model_copy(update={"at": 130.0}), state, "auto", decided)
    assert not should_write(last, shown)
    assert summarize(decision, state, "advisory", {"prefill": 2, "decode": 2}).applied
    assert summarize(
        decision.model_copy(update={"hold": True}), state, "auto", {"prefill": None, "decode": 2}
    ).applied
