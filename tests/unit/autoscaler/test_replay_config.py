"""The replay runs the policy as the operator configures it: a DisaggregatedModel with no autoscaling
timings set gets the same decision interval, scale-down windows and cooldowns in both places."""

from __future__ import annotations

import sys
from pathlib import Path

from kvrelay_operator import api
from kvrelay_operator.autoscaler import kopf_timer

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "bench"))

from sim.model import ReplicaModel  # noqa: E402
from sim.replay import Scenario  # noqa: E402
from sim.traces import Trace  # noqa: E402

TIMINGS = (
    "interval_seconds", "scale_up_cooldown_seconds", "scale_down_cooldown_seconds",
    "scale_down_window_seconds", "scale_down_step_seconds",
)  # fmt: skip


def test_the_replay_uses_the_operators_default_timings() -> None:
    spec = api.DisaggregatedModelSpec.model_validate({"model": {"source": "meta-llama/Llama-3.1-8B"}})
    operator = kopf_timer.policy_config(spec)
    scenario = Scenario(Trace("t", []), ReplicaModel(), ttft_slo_seconds=1.0, itl_slo_seconds=0.05)
    replay = scenario.policy_config()
    assert {k: getattr(replay, k) for k in TIMINGS} == {k: getattr(operator, k) for k in TIMINGS}
