"""`bench/autoscaler_replay.py --plot`: a replay records each policy's timeline, and the picture is a PNG
with the three panels' data in it."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "bench"))

from sim.controllers import KvrelayController, StaticController  # noqa: E402
from sim.model import ReplicaModel  # noqa: E402
from sim.plot import plot_trace  # noqa: E402
from sim.replay import Scenario, Timeline, run  # noqa: E402
from sim.traces import Trace  # noqa: E402


def _scenario() -> Scenario:
    # 6 minutes: 2 requests/s, then 12/s (a step the autoscaler must follow)
    requests = [(i * 0.5, 1024, 100) for i in range(240)] + [(120 + i / 12, 1024, 100) for i in range(2880)]
    return Scenario(
        trace=Trace("step", requests), model=ReplicaModel(), ttft_slo_seconds=1.5, itl_slo_seconds=0.03
    )


def test_timeline_follows_the_replay_and_the_picture_is_written(tmp_path: Path) -> None:
    scenario = _scenario()
    static, auto = Timeline(), Timeline()
    run(scenario, StaticController("static", 2, 1), (2, 1), static)
    result = run(scenario, KvrelayController(scenario.policy_config()), (1, 1), auto)
    steps = len(auto.times)
    assert steps >= scenario.trace.duration_seconds / scenario.interval_seconds
    assert len(auto.replicas["prefill"]) == len(auto.replicas["decode"]) == steps
    assert set(static.replicas["prefill"]) == {2}
    assert max(auto.replicas["prefill"]) > auto.replicas["prefill"][0], "the step up was followed"
    assert len(auto.arrivals) == len(auto.in_slo) == result["requests"]
    assert abs(sum(auto.in_slo) / len(auto.in_slo) - float(result["slo_attainment"])) < 1e-4  # type: ignore[arg-type]
    path = plot_trace(tmp_path / "step.png", scenario.trace, {"static": static, "kvrelay": auto})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
