"""The pure policy on scripted metric sequences (virtual clock, no I/O)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pytest
from kvrelay_operator.autoscaler.load import _backlog_rate
from kvrelay_operator.autoscaler.policy import decide, prefill_replicas_needed
from kvrelay_operator.autoscaler.types import (
    Decision,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    Snapshot,
)

INTERVAL = 30.0
# Seeds: a prefill replica does 10k prompt tokens/s, a decode replica 2k tokens/s at the ITL SLO.
PREFILL_CAP = 10_000.0
DECODE_CAP = 2_000.0
PROMPT = 1_000.0  # tokens per request
OUTPUT = 200.0


def make_config(**overrides: object) -> PolicyConfig:
    base: dict[str, object] = {
        "ttft_slo_seconds": 1.0,
        "itl_slo_seconds": 0.05,
        "prefill": RoleLimits(min_replicas=1, max_replicas=40),
        "decode": RoleLimits(min_replicas=1, max_replicas=40),
        "interval_seconds": INTERVAL,
        "prefill_tokens_per_second": PREFILL_CAP,
        "decode_tokens_per_second": DECODE_CAP,
        "learn_capacity": False,
    }
    base.update(overrides)
    return PolicyConfig(**base)  # type: ignore[arg-type]


def metrics_for(now: float, request_rate: float, **overrides: object) -> MetricsSample:
    """Metrics of a pool serving `request_rate` requests/s without backlog."""
    values: dict[str, object] = {
        "observed_at": now,
        "window_seconds": INTERVAL,
        "ttft_seconds": 0.3,
        "itl_seconds": 0.03,
        "request_rate": request_rate,
        "prompt_tokens_per_second": request_rate * PROMPT,
        "generation_tokens_per_second": request_rate * OUTPUT,
        "queued_prefill_tokens": 0.0,
        "prefill_requests_waiting": 0.0,
        "decode_requests_waiting": 0.0,
    }
    values.update(overrides)
    return MetricsSample(**values)  # type: ignore[arg-type]


@dataclass
class FakePools:
    """Applies decisions like the reconciler; new replicas become ready after `load_steps` ticks."""

    prefill: int
    decode: int
    load_steps: int = 0
    config: PolicyConfig = field(default_factory=make_config)
    state: PolicyState = field(default_factory=PolicyState)
    now: float = 0.0
    decisions: list[Decision] = field(default_factory=list)
    _ready_at: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ready_at = {"prefill": [0.0] * self.prefill, "decode": [0.0] * self.decode}

    def replicas(self, role: str) -> RoleReplicas:
        times = self._ready_at[role]
        return RoleReplicas(current=len(times), ready=sum(1 for t in times if t <= self.now))

    def tick(self, request_rate: float | None, **overrides: object) -> Decision:
        self.now += INTERVAL
        metrics = None if request_rate is None else metrics_for(self.now, request_rate, **overrides)
        snapshot = Snapshot(metrics=metrics, prefill=self.replicas("prefill"), decode=self.replicas("decode"))
        decision, self.state = decide(snapshot, self.state, self.config, self.now)
        for role in ("prefill", "decode"):
            times = self._ready_at[role]
            want = decision.role(role).replicas  # type: ignore[arg-type]
            while len(times) < want:
                times.append(self.now + self.load_steps * INTERVAL)
            # Scale-down removes the newest (still loading) replicas first, like the simulator.
            del times[want:]
        self.decisions.append(decision)
        return decision


def reversals(decisions: list[Decision], role: str) -> int:
    moves = [d.role(role).direction for d in decisions if d.role(role).direction != "none"]  # type: ignore[arg-type]
    return sum(1 for a, b in itertools.pairwise(moves) if a != b)


def test_burst_scales_up_in_one_decision_to_what_the_load_needs() -> None:
    pools = FakePools(prefill=2, decode=2)
    for _ in range(4):
        pools.tick(10.0)  # 10k prompt tok/s, 2k gen tok/s
    assert pools.replicas("prefill").current == 2
    decision = pools.tick(60.0)  # 6x burst: 60k prompt tok/s, 12k gen tok/s
    assert decision.prefill.direction == "up" and decision.decode.direction == "up"
    # One decision covers the whole burst, not +1 per interval.
    assert decision.prefill.replicas >= math.ceil(60_000 / PREFILL_CAP / 0.95)
    assert decision.decode.replicas >= math.ceil(12_000 / DECODE_CAP / 0.9)
    assert "load needs" in decision.prefill.reason
    assert decision.inputs["prompt_tokens_per_second"] == pytest.approx(60_000)
    # Rising demand is extrapolated over a replica start, but a step is not mistaken for a ramp.
    assert 60_000 <= decision.inputs["prefill_forecast_tokens_per_second"] <= 90_000


def test_saturated_prefill_teaches_capacity_and_its_backlog_adds_demand() -> None:
    # The profile claims 20k tok/s per replica; the pool really computes 10k.
    config = make_config(learn_capacity=True, prefill_tokens_per_second=20_000.0)
    state = PolicyState()
    decision = None
    queued = 100_000.0
    for step in range(1, 12):
        now = step * INTERVAL
        # 30k tok/s admitted, 2 replicas compute 20k: the queue grows by 10k tok/s.
        queued += 10_000 * INTERVAL
        metrics = metrics_for(now, 30.0, queued_prefill_tokens=queued)
        snapshot = Snapshot(
            metrics=metrics, prefill=RoleReplicas(current=2, ready=2), decode=RoleReplicas(current=9, ready=9)
        )
        decision, state = decide(snapshot, state, config, now)
    assert decision is not None
    assert decision.inputs["prefill_served_tokens_per_second"] == pytest.approx(20_000)
    assert decision.inputs["prefill_capacity_tokens_per_second"] == pytest.approx(10_000, rel=0.05)
    # Offered 30k at 10k per replica plus draining the backlog over a replica start.
    drain = queued / config.replica_startup_seconds
    assert decision.inputs["prefill_demand_tokens_per_second"] >= 30_000 + drain
    assert decision.prefill.replicas >= math.ceil((30_000 + drain) / 10_000)


def test_slow_ramp_only_scales_up_and_tracks_the_need() -> None:
    pools = FakePools(prefill=1, decode=1)
    for step in range(60):
        rate = 5.0 + step  # +1 req/s every 30 s
        decision = pools.tick(rate)
        assert decision.prefill.replicas >= math.ceil(rate * PROMPT / PREFILL_CAP)
        assert decision.decode.replicas >= math.ceil(rate * OUTPUT / DECODE_CAP)
    assert all(d.prefill.direction != "down" and d.decode.direction != "down" for d in pools.decisions)
    assert pools.replicas("prefill").current > 5


def test_idle_scales_down_stepwise_to_min_never_zero() -> None:
    pools = FakePools(prefill=2, decode=2)
    pools.tick(60.0)
    high_p = pools.replicas("prefill").current
    assert high_p >= 6
    downs_at: list[float] = []
    for _ in range(80):
        decision = pools.tick(0.0)
        if decision.prefill.direction == "down":
            downs_at.append(pools.now)
            # Step cap: never more than a third of the pool at once.
            assert decision.prefill.previous - decision.prefill.replicas <= max(
                1, decision.prefill.previous // 3
            )
    assert pools.replicas("prefill").current == 1 and pools.replicas("decode").current == 1
    # Nothing goes down within the scale-down cooldown after the scale-up.
    assert downs_at[0] - INTERVAL >= pools.config.scale_down_cooldown_seconds
    assert all(b - a >= pools.config.scale_down_step_seconds for a, b in itertools.pairwise(downs_at))


def test_scale_down_only_when_n_minus_1_holds_the_window_peak() -> None:
    pools = FakePools(prefill=4, decode=4)
    # 30k tok/s: 4 replicas at 75%; 3 would sit at 100% and miss TTFT by queueing.
    for _ in range(20):
        decision = pools.tick(30.0)
        assert decision.prefill.replicas == 4, decision.prefill.reason
    # One quiet interval inside the window proves nothing about N-1.
    decision = pools.tick(5.0)
    assert decision.prefill.replicas == 4
    assert decision.inputs["prefill_window_peak_tokens_per_second"] == pytest.approx(30_000)


def test_no_scale_down_before_a_full_window_of_metrics() -> None:
    pools = FakePools(prefill=6, decode=6)
    windows = int(pools.config.scale_down_window_seconds // INTERVAL)
    for _ in range(windows - 1):
        decision = pools.tick(1.0)
        assert decision.prefill.direction == "none" and decision.decode.direction == "none"
    for _ in range(3):
        pools.tick(1.0)
    assert pools.replicas("prefill").current < 6


@pytest.mark.parametrize(
    ("observed_at_offset", "overrides", "why"),
    [
        (-600.0, {}, "stale"),
        (0.0, {"generation_tokens_per_second": None}, "missing metrics"),
    ],
)
def test_stale_or_missing_metrics_hold(
    observed_at_offset: float, overrides: dict[str, object], why: str
) -> None:
    config = make_config(prefill=RoleLimits(min_replicas=0, max_replicas=10))
    now = 1_000.0
    metrics = metrics_for(now + observed_at_offset, 0.0, **overrides)
    snapshot = Snapshot(
        metrics=metrics, prefill=RoleReplicas(current=5, ready=5), decode=RoleReplicas(current=3, ready=3)
    )
    state = PolicyState()
    decision, new_state = decide(snapshot, state, config, now)
    assert decision.hold
    assert (decision.prefill.replicas, decision.decode.replicas) == (5, 3)
    assert why in decision.reason
    assert new_state.metrics_since is None
    assert new_state.model_copy(update={"metrics_since": state.metrics_since}) == state


def test_no_metrics_at_all_hold_and_do_not_scale_to_zero() -> None:
    pools = FakePools(
        prefill=3, decode=2, config=make_config(prefill=RoleLimits(min_replicas=0, max_replicas=9))
    )
    for _ in range(20):
        decision = pools.tick(None)
        assert decision.hold and decision.reason == "hold: no metrics"
    assert (pools.replicas("prefill").current, pools.replicas("decode").current) == (3, 2)


def test_budget_exhausted_splits_gpus_by_need() -> None:
    config = make_config(
        prefill=RoleLimits(min_replicas=1, max_replicas=40, gpus_per_replica=2),
        decode=RoleLimits(min_replicas=1, max_replicas=40, gpus_per_replica=1),
        gpu_budget=12,
    )
    pools = FakePools(prefill=1, decode=1, config=config)
    decision = pools.tick(60.0)  # unbounded need: 7 prefill (14 GPUs) + 7 decode (7 GPUs)
    gpus = decision.prefill.replicas * 2 + decision.decode.replicas
    assert gpus <= 12
    assert decision.limited
    assert "GPU budget 12" in decision.reason
    # Both roles get a comparable share of what they need, not first-come-first-served.
    share_p = decision.prefill.replicas / decision.prefill.needed
    share_d = decision.decode.replicas / decision.decode.needed
    assert abs(share_p - share_d) < 0.3
    assert decision.prefill.replicas >= 2 and decision.decode.replicas >= 2


def test_replicas_still_loading_count_as_coming_capacity() -> None:
    pools = FakePools(prefill=2, decode=2, load_steps=4)  # 2 minutes to become ready
    pools.tick(10.0)
    first = pools.tick(60.0, queued_prefill_tokens=200_000.0)
    assert first.prefill.direction == "up"
    target = first.prefill.replicas
    for _ in range(3):  # same load while the new replicas load: nothing piles up
        decision = pools.tick(60.0, ttft_seconds=5.0, queued_prefill_tokens=200_000.0)
        assert decision.prefill.replicas == target, decision.prefill.reason
        assert pools.replicas("prefill").pending > 0
    # The load vanishes while they still load: no scale-down either.
    assert pools.replicas("prefill").pending > 0
    decision = pools.tick(1.0)
    assert decision.prefill.replicas == target


def test_flapping_load_does_not_oscillate() -> None:
    pools = FakePools(prefill=2, decode=2)
    for step in range(120):  # one hour, load alternates high/low every interval
        pools.tick(40.0 if step % 2 == 0 else 10.0)
    assert reversals(pools.decisions, "prefill") <= 1
    assert reversals(pools.decisions, "decode") <= 1
    # Sized for the high phase the whole time.
    assert pools.replicas("prefill").current >= math.ceil(40_000 / PREFILL_CAP)


def test_ratio_bounds_raise_the_short_side() -> None:
    config = make_config(ratio_max=2.0, ratio_min=0.5)
    pools = FakePools(prefill=1, decode=1, config=config)
    # Prompt-heavy: prefill needs ~9, decode 1.
    decision = pools.tick(80.0, generation_tokens_per_second=100.0)
    assert decision.prefill.replicas / decision.decode.replicas <= 2.0
    assert decision.decode.replicas >= math.ceil(decision.prefill.replicas / 2.0)
    assert "ratio max 2.0" in decision.decode.reason


def test_slo_violation_without_modelled_need_adds_one_replica() -> None:
    pools = FakePools(prefill=2, decode=2)
    pools.tick(5.0)
    # The model says 1 decode replica is enough, but ITL misses and requests wait for decode.
    decision = pools.tick(5.0, itl_seconds=0.2, decode_requests_waiting=3.0)
    assert decision.decode.direction == "up" and decision.decode.replicas == 3
    assert "ITL above SLO" in decision.decode.reason


def test_prefill_sizing_accounts_for_queueing_and_kv_transfer() -> None:
    config = make_config()
    relaxed = prefill_replicas_needed(80_000, PREFILL_CAP, PROMPT, 0.0, config.model_copy(), 0.95)
    tight = prefill_replicas_needed(
        80_000, PREFILL_CAP, PROMPT, 0.0, config.model_copy(update={"ttft_slo_seconds": 0.15}), 0.95
    )
    with_transfer = prefill_replicas_needed(
        80_000, PREFILL_CAP, PROMPT, 0.04, config.model_copy(update={"ttft_slo_seconds": 0.15}), 0.95
    )
    assert relaxed == math.ceil(80_000 / (PREFILL_CAP * 0.95))
    assert tight > relaxed  # a small TTFT budget leaves little room to queue
    assert with_transfer > tight  # KV transfer eats into the same budget


def test_capacity_is_learned_from_observed_throughput() -> None:
    config = make_config(learn_capacity=True)
    pools = FakePools(prefill=4, decode=4, config=config)
    # Prefill is really 5k tok/s per replica, half the profile: 20k tok/s keep 4 replica-seconds busy.
    for _ in range(15):
        decision = pools.tick(20.0, prefill_busy_seconds_per_second=20_000 / 5_000)
    assert decision.inputs["prefill_capacity_tokens_per_second"] == pytest.approx(5_000, rel=0.05)
    assert decision.prefill.replicas >= 5


def test_decisions_round_trip_as_json_with_reason_and_inputs() -> None:
    pools = FakePools(prefill=2, decode=2)
    decision = pools.tick(30.0)
    again = Decision.model_validate_json(decision.model_dump_json())
    assert again == decision
    assert decision.reason.startswith("prefill: ")
    for key in ("prefill_demand_tokens_per_second", "decode_capacity_tokens_per_second", "ttft_seconds"):
        assert key in decision.inputs
    state = PolicyState.model_validate_json(pools.state.model_dump_json())
    assert state == pools.state


def test_config_validation_explains_the_fix() -> None:
    with pytest.raises(ValueError, match=r"ratio_min 3\.0 > ratio_max 1\.0"):
        make_config(ratio_min=3.0, ratio_max=1.0)
    with pytest.raises(ValueError, match="gpu_budget 2 < 4"):
        make_config(
            gpu_budget=2,
            prefill=RoleLimits(min_replicas=1, max_replicas=4, gpus_per_replica=2),
            decode=RoleLimits(min_replicas=1, max_replicas=4, gpus_per_replica=2),
        )


def test_policy_layer_imports_no_io_frameworks() -> None:
    """The decision code must stay pure: no kube client, kopf, torch or HTTP client behind it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import kvrelay_operator.autoscaler.policy, kvrelay_operator.autoscaler.decision_log\n"
        "import kvrelay_operator.autoscaler.prometheus\n"
        "banned = ('kopf', 'kubernetes', 'torch', 'prometheus_api_client', 'requests')\n"
        "bad = [m for m in banned if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"pure autoscaler modules pulled in: {out.stdout.strip()}"


def test_backlog_sized_in_one_step_and_its_surplus_released_once_drained() -> None:
    pools = FakePools(prefill=4, decode=4, load_steps=2)
    for _ in range(8):  # a full scale-down window of steady metrics at 30k tok/s
        pools.tick(30.0)
    # A burst left 600k prompt tokens queued: size for the backlog as it will be when new
    # replicas serve (it grows until then), drained within backlog_drain_seconds, in one step.
    up = pools.tick(30.0, queued_prefill_tokens=600_000.0, ttft_seconds=5.0)
    assert up.prefill.direction == "up"
    assert (
        up.inputs["prefill_demand_tokens_per_second"] >= 30_000 + 600_000 / pools.config.backlog_drain_seconds
    )
    up_at = pools.now
    # While they load, the same backlog asks for nothing more.
    held = pools.tick(30.0, queued_prefill_tokens=600_000.0, ttft_seconds=5.0)
    assert pools.replicas("prefill").pending > 0
    assert held.prefill.replicas == up.prefill.replicas, held.prefill.reason
    # Drained: the replicas added for the backlog go before the scale-down cooldown; the steady
    # need stays.
    down = pools.tick(30.0)
    assert down.prefill.direction == "down" and "backlog drained" in down.prefill.reason
    assert pools.now - up_at < pools.config.scale_down_cooldown_seconds
    assert math.ceil(30_000 / PREFILL_CAP / 0.95) <= down.prefill.replicas < up.prefill.replicas
    # And nothing flaps back up at the same load.
    for _ in range(10):
        assert pools.tick(30.0).prefill.direction != "up"


def test_prefill_holds_headroom_for_a_surge_seen_recently() -> None:
    # 40k tok/s needs 5 prefill replicas at 95%; a +25% surge within a reaction time needs 6.
    quiet = FakePools(prefill=5, decode=5, config=make_config(max_surge_headroom=0.0))
    surged = FakePools(prefill=5, decode=5)
    for pools in (quiet, surged):
        for rate in [40.0] * 6 + [50.0] * 2 + [40.0] * 20:
            pools.tick(rate)
    # Without the headroom the pool shrinks back to what 40k needs...
    assert quiet.replicas("prefill").current == math.ceil(40_000 / (PREFILL_CAP * 0.95))
    # ...with it, the surge (+25% within a start) keeps a replica for the next one.
    decision = surged.decisions[-1]
    assert decision.inputs["prefill_surge_ratio"] == pytest.approx(1.25)
    assert surged.replicas("prefill").current == math.ceil(40_000 * 1.25 / (PREFILL_CAP * 0.95))
    # A flat load has no surge: no headroom is bought.
    flat = FakePools(prefill=5, decode=5)
    for _ in range(10):
        decision = flat.tick(40.0)
    assert decision.inputs["prefill_surge_ratio"] == pytest.approx(1.0)
    assert flat.replicas("prefill").current == 5


def test_surge_headroom_is_capped_and_forgets_old_surges() -> None:
    config = make_config(max_surge_headroom=0.25, surge_window_seconds=600.0)
    pools = FakePools(prefill=5, decode=5, config=config)
    for rate in [20.0] * 6 + [60.0] * 2 + [40.0] * 4:
        decision = pools.tick(rate)
    # A x3 step is capped at +25%.
    assert decision.inputs["prefill_surge_ratio"] == pytest.approx(1.25)
    for _ in range(int(600 / INTERVAL) + 2):
        decision = pools.tick(40.0)
    assert decision.inputs["prefill_surge_ratio"] == pytest.approx(1.0)


def _damped_pools(high_rate: float) -> FakePools:
    """Pools sized for `high_rate`, prefill then damped x4 as after two regretted scale-downs."""
    pools = FakePools(prefill=9, decode=9, config=make_config(max_surge_headroom=0.0))
    for _ in range(12):
        pools.tick(high_rate)
    assert pools.replicas("prefill").current == 9
    prefill = pools.state.prefill.model_copy(update={"damping": 4.0, "last_reversal_at": pools.now})
    pools.state = pools.state.model_copy(update={"prefill": prefill})
    return pools


def test_flap_damping_ends_once_the_load_settles_well_below_what_runs() -> None:
    pools = _damped_pools(80.0)
    high = pools.replicas("prefill").current
    config = pools.config
    dropped_at = pools.now
    downs: list[float] = []
    for _ in range(20):  # 10 minutes at three eighths of the load, flat
        decision = pools.tick(30.0)
        if decision.prefill.direction == "down":
            downs.append(pools.now - dropped_at)
    low = math.ceil(30_000 / (PREFILL_CAP * 0.95))
    # Damped, the first step would wait for the 720 s window and the 1200 s cooldown; a load
    # settled several replicas lower has not flapped: a base window (and its trend) suffices.
    assert downs and downs[0] <= config.scale_down_window_seconds + config.trend_window_seconds
    assert pools.state.prefill.damping == 1.0
    assert high - low >= 4 and pools.replicas("prefill").current <= low + 1


def test_flap_damping_holds_for_a_one_replica_dip() -> None:
    # 80k -> 65k tok/s: one prefill replica fewer would hold it, the kind of dip that flaps.
    pools = _damped_pools(80.0)
    high = pools.replicas("prefill").current
    for _ in range(20):
        decision = pools.tick(65.0)
        assert decision.prefill.direction == "none", decision.prefill.reason
    assert pools.replicas("prefill").current == high
    assert pools.state.prefill.damping == 4.0


def test_decode_extrapolates_the_arrivals_trend_not_a_flushed_backlog() -> None:
    ramp = FakePools(prefill=4, decode=4)
    flush = FakePools(prefill=4, decode=4)
    for k in range(8):
        rate = 20.0 + 4.0 * k
        on_ramp = ramp.tick(rate)
        # The same rise of generated tokens/s with arrivals flat: a prefill backlog reaching decode.
        flushed = flush.tick(20.0, generation_tokens_per_second=rate * OUTPUT)
    # Arrivals rising: decode demand is extrapolated over a replica start...
    assert on_ramp.inputs["decode_forecast_tokens_per_second"] > 1.2 * rate * OUTPUT
    # ...flat arrivals: what decode makes now is the demand; the flush ends by itself.
    assert flushed.inputs["decode_forecast_tokens_per_second"] == pytest.approx(rate * OUTPUT)
    assert flushed.decode.needed < on_ramp.decode.needed


def test_reversal_budget_bounds_turns_per_hour_whatever_the_load() -> None:
    # Four hours of a load that rises and falls every 10 minutes: every fall invites a scale-down
    # and every rise forces a scale-up; the budget allows one down-up pair per window, no more.
    pools = FakePools(prefill=2, decode=2, config=make_config(max_surge_headroom=0.0))
    turns: dict[str, list[float]] = {"prefill": [], "decode": []}
    last: dict[str, str] = {}
    for step in range(480):
        decision = pools.tick(60.0 if (step // 20) % 2 == 0 else 10.0)
        for role in ("prefill", "decode"):
            direction = decision.role(role).direction  # type: ignore[arg-type]
            if direction != "none":
                if last.get(role) not in (None, direction):
                    turns[role].append(pools.now)
                last[role] = direction
    window = pools.config.reversal_window_seconds
    for role, times in turns.items():
        assert times, f"{role} never scaled down: the test load does not exercise the budget"
        # Any window of the budget's length holds at most `reversal_budget` reversals.
        for at in times:
            assert sum(1 for t in times if at <= t < at + window) <= pools.config.reversal_budget, (
                role,
                times,
            )
    # The memory is trimmed to the window at each change: it does not grow with time.
    assert len(pools.state.prefill.reversal_times) <= pools.config.reversal_budget


def test_a_scale_down_that_would_exceed_the_budget_holds_and_says_why() -> None:
    pools = FakePools(prefill=2, decode=2, config=make_config(max_surge_headroom=0.0))
    pools.tick(60.0)  # scale up
    prefill = pools.state.prefill.model_copy(update={"reversal_times": (pools.now,)})
    pools.state = pools.state.model_copy(update={"prefill": prefill})
    for _ in range(30):
        decision = pools.tick(5.0)
        assert decision.prefill.direction != "down"
    assert "reversal budget (1 in the last 3600s, budget 2)" in decision.prefill.reason
    assert decision.prefill.code == "cooldown"


def test_a_ttft_miss_over_a_short_queue_adds_no_replica() -> None:
    # p99 TTFT misses, but the queue drains in 0.05 s at the pool's rate: the misses are prompts
    # whose own prefill outlasts the SLO, which no replica shortens.
    pools = FakePools(prefill=4, decode=4)
    pools.tick(20.0)
    short = pools.tick(20.0, ttft_seconds=3.0, queued_prefill_tokens=2_000.0, prefill_requests_waiting=1.0)
    assert short.prefill.direction == "none", short.prefill.reason
    # The same miss over a queue worth a second of the pool's capacity is a shortage: one more.
    long = pools.tick(20.0, ttft_seconds=3.0, queued_prefill_tokens=40_000.0, prefill_requests_waiting=40.0)
    assert long.prefill.direction == "up"


def test_one_long_prompt_in_the_queue_drains_at_one_replica_not_ten() -> None:
    config = make_config()
    # 600k queued tokens, to drain in 30 s: 20k tok/s, two replicas' worth, if they are many
    # prompts; as one prompt only one replica can work on it.
    one = _backlog_rate(
        600_000.0, 600_000.0, metrics_for(0.0, 10.0, prefill_requests_waiting=1.0), 10_000.0, config
    )
    many = _backlog_rate(
        600_000.0, 600_000.0, metrics_for(0.0, 10.0, prefill_requests_waiting=600.0), 10_000.0, config
    )
    assert one == pytest.approx(10_000.0) and many == pytest.approx(20_000.0)
    # Growth still to come (arrivals, each its own prompt) is not capped.
    grown = _backlog_rate(
        900_000.0, 600_000.0, metrics_for(0.0, 10.0, prefill_requests_waiting=1.0), 10_000.0, config
    )
    assert grown == pytest.approx(10_000.0 + 300_000.0 / config.backlog_drain_seconds)


def test_a_jittery_load_buys_no_surge_headroom() -> None:
    # +/-15% between windows around a flat 40k tok/s: its highest window is 30% over its lowest,
    # but it has not surged; a +25% step out of a flat load still has.
    jitter = FakePools(prefill=5, decode=5)
    for k in range(30):
        decision = jitter.tick(40.0 * (1.15 if k % 4 < 2 else 0.85))
    assert decision.inputs["prefill_surge_ratio"] < 1.1


def test_a_dip_of_one_replica_does_not_spend_the_reversal_budget() -> None:
    config = make_config(max_surge_headroom=0.0)
    pools = FakePools(prefill=8, decode=8, config=config)
    for _ in range(12):  # the load outgrows 8 replicas: the last move is up
        pools.tick(90.0)
    assert pools.state.prefill.last_direction == "up"
    high = pools.replicas("prefill").current
    per_replica = PREFILL_CAP * config.prefill_target_utilization / PROMPT
    for _ in range(30):  # one replica's worth lower: less than a quarter of the pool
        decision = pools.tick(90.0 - per_replica)
        assert decision.prefill.direction != "down", decision.prefill.reason
    assert "worth a reversal" in decision.prefill.reason and pools.replicas("prefill").current == high
    for _ in range(30):  # half the load: worth it
        pools.tick(45.0)
    assert pools.replicas("prefill").current < high
