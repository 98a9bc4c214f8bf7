"""Early decisions between decisions (autoscaler/early.py): only a prefill queue already past the TTFT
SLO, with nothing loading, triggers one; only a decision that adds prefill and removes nothing is taken;
the operator's timer checks every 10 s between decisions; on a replayed step it acts sooner."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from kvrelay_operator.autoscaler import kopf_timer
from kvrelay_operator.autoscaler.early import CHECK_SECONDS, prefill_overrun, take_early
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.types import PolicyState, RoleReplicas, RoleState, Snapshot
from test_policy import INTERVAL, PREFILL_CAP, make_config, metrics_for

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "bench"))

from sim.controllers import KvrelayController  # noqa: E402
from sim.model import ReplicaModel  # noqa: E402
from sim.replay import Scenario, run  # noqa: E402
from sim.traces import synthetic  # noqa: E402


def snap(queued: float, ready: int, current: int | None = None) -> Snapshot:
    return Snapshot(
        metrics=metrics_for(100.0, 4.0, queued_prefill_tokens=queued),
        prefill=RoleReplicas(current=ready if current is None else current, ready=ready),
        decode=RoleReplicas(current=2, ready=2),
    )


def test_only_a_queue_past_the_ttft_slo_with_nothing_loading_is_an_overrun() -> None:
    config = make_config()  # TTFT SLO 1 s, seed 10k prompt tokens/s per replica
    state = PolicyState()
    two = RoleReplicas(current=2, ready=2)
    at_slo = 2 * PREFILL_CAP * config.ttft_slo_seconds  # what two replicas drain in one SLO
    assert prefill_overrun(at_slo, two, state, config) is None
    assert prefill_overrun(3 * at_slo, two, state, config) == 3.0
    loading = RoleReplicas(current=3, ready=2)
    assert prefill_overrun(3 * at_slo, loading, state, config) is None  # a replica is on its way
    assert prefill_overrun(0.0, two, state, config) is None
    assert prefill_overrun(None, two, state, config) is None  # the gauge could not be read
    assert prefill_overrun(3 * at_slo, RoleReplicas(current=0, ready=0), state, config) is None
    # The learned capacity, not the seed, says how long the queue takes.
    learned = PolicyState(prefill=RoleState(capacity_tokens_per_second=4 * PREFILL_CAP))
    assert prefill_overrun(3 * at_slo, two, learned, config) is None


def test_an_overrun_decision_adds_prefill_and_is_taken() -> None:
    config = make_config()
    snapshot = snap(10 * 2 * PREFILL_CAP, 2)
    decision, _ = decide(snapshot, PolicyState(), config, 100.0)
    assert decision.prefill.direction == "up" and decision.prefill.replicas > 2
    assert take_early(decision)
    steady, _ = decide(snap(0.0, 2), PolicyState(), config, 100.0)
    assert not take_early(steady)  # nothing added: not taken
    down = decision.model_copy(update={"decode": decision.decode.model_copy(update={"direction": "down"})})
    assert not take_early(down)  # an early decision never removes replicas
    assert not take_early(decision.model_copy(update={"hold": True}))


def test_the_timer_checks_every_ten_seconds_between_decisions() -> None:
    config = make_config()
    runtime = kopf_timer._Runtime()
    assert kopf_timer.next_step(runtime, config.interval_seconds, 0.0) == "decide"
    runtime.last_decision_at = runtime.last_check_at = 0.0
    runtime.state = PolicyState()
    steps = {}
    for t in (5.0, 10.0, 15.0, 20.0, 25.0, 30.0):
        steps[t] = kopf_timer.next_step(runtime, config.interval_seconds, t)
        if steps[t] is not None:
            runtime.last_check_at = t
    assert steps == {5.0: None, 10.0: "check", 15.0: None, 20.0: "check", 25.0: None, 30.0: "decide"}
    # No state yet (nothing decided), or decisions as often as checks: no early checks.
    assert kopf_timer.next_step(kopf_timer._Runtime(last_decision_at=0.0), INTERVAL, 10.0) is None
    runtime = kopf_timer._Runtime(state=PolicyState(), last_decision_at=0.0, last_check_at=0.0)
    assert kopf_timer.next_step(runtime, CHECK_SECONDS, 5.0) is None
    assert kopf_timer.next_step(runtime, CHECK_SECONDS, 10.0) == "decide"
    assert math.isinf(kopf_timer._Runtime().last_check_at)


def test_on_a_replayed_step_an_early_decision_comes_before_the_next_interval() -> None:
    # Quiet, a x3 step 5 s after a decision (30 s grid), quiet again: the replay's step. (On a x6 step
    # the early decision, sized from 5 s of it, is followed by a smaller gain or a loss: README.)
    trace = synthetic("step", [(0, 10.0), (185, 30.0), (365, 10.0)], 480, [(1024, 120)], seed=5)
    scenario = Scenario(trace=trace, model=ReplicaModel(), ttft_slo_seconds=1.5, itl_slo_seconds=0.030)
    early = KvrelayController(scenario.policy_config())
    late = KvrelayController(scenario.policy_config())
    late.interval_seconds = INTERVAL  # decisions only (how the policy ran before early checks)
    start = (2, 1)
    with_checks = run(scenario, early, start)
    without = run(scenario, late, start)
    first_up = min(d.at for d in early.decisions if d.prefill.direction == "up")
    assert 185 < first_up < 210 and first_up % INTERVAL != 0  # between the decisions at 180 and 210
    assert min(d.at for d in late.decisions if d.prefill.direction == "up") >= 210
    assert float(with_checks["slo_attainment"]) > float(without["slo_attainment"])  # type: ignore[arg-type]
