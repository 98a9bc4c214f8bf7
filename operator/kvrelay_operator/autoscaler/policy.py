"""The SLO autoscaling policy: `decide(snapshot, state, config, now) -> (Decision, new_state)`.

Pure: no clock, no I/O, no kubernetes/kopf/torch. One decision reads as:
check metrics -> learn per-replica capacity -> estimate demand -> replicas the SLOs need
-> stabilise (fast up, proven N-1 down, cooldowns, step caps) -> bounds, ratio, GPU budget.
"""

from __future__ import annotations

import dataclasses
import math

from kvrelay_operator.autoscaler.estimators import (
    Demand,
    demand_surge,
    demand_trend,
    estimate_demand,
    kv_cache_replicas,
    learn_capacity,
    mean_prompt_tokens,
)
from kvrelay_operator.autoscaler.queueing import servers_for_wait
from kvrelay_operator.autoscaler.types import (
    ROLES,
    Decision,
    DemandSample,
    Direction,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    Role,
    RoleDecision,
    RoleState,
    Snapshot,
)

_MAX_TREND_GAIN = 0.5
_MAX_DAMPING = 4.0
# Queued prompt tokens worth this share of an interval of ready capacity: the pool ran saturated.
_SATURATED_SHARE = 0.25
# Replicas above the steady need released early once a backlog drained: only a real burst's
# surplus (at least this share of the steady need, and two replicas), not queueing noise.
_BURST_SURPLUS = 0.25
# Demand rising by more than this share over a replica start holds scale-down.
_RISING_SHARE = 0.05
# A prefill queue below this many seconds of ready capacity counts as drained.
_DRAINED_QUEUE_SECONDS = 0.5
# Replicas a base scale-down window must show surplus (a flap is one) for a settled load to end
# flap damping.
_SETTLED_SURPLUS = 2


def decide(
    snapshot: Snapshot, state: PolicyState, config: PolicyConfig, now: float
) -> tuple[Decision, PolicyState]:
    """Decide desired prefill and decode replicas from one metrics snapshot."""
    metrics = snapshot.metrics
    problem = _metrics_problem(metrics, config, now)
    if problem is not None or metrics is None:
        # A gap breaks the evidence for scale-down: the window starts again after it.
        return _hold(snapshot, config, now, problem or "no metrics"), state.model_copy(
            update={"metrics_since": None}
        )
    metrics_since = now if state.metrics_since is None else state.metrics_since

    demand = estimate_demand(metrics, state, config, now)
    capacity = learn_capacity(metrics, snapshot, state, config, demand)
    queued_p = metrics.queued_prefill_tokens or 0.0
    offered_p = demand.steady_p
    ready_capacity_p = snapshot.prefill.ready * capacity["prefill"]
    demand, saturated_p = _saturated_demand(demand, snapshot, state, config, capacity, queued_p)
    # History (scale-down window, trend) keeps the offered rate: the saturated estimate above
    # overstates while replicas that just became ready are counted as if they served all along.
    sample = DemandSample(
        at=now, prefill_tokens_per_second=offered_p, decode_tokens_per_second=demand.steady_d
    )
    longest = max(config.scale_down_window_seconds * _MAX_DAMPING, config.surge_window_seconds)
    history = (*_trim_history(state.demand_history, now - longest), sample)
    roles_state = {role: _decay_damping(state.role(role), config, now) for role in ROLES}
    # A replica asked for now serves after a start and up to an interval; rates over a window lag
    # the load by half of it.
    lead = config.replica_startup_seconds + config.interval_seconds + metrics.window_seconds / 2
    level: dict[Role, float] = {"prefill": offered_p, "decode": demand.steady_d}
    trend = _clear_trend(history, now, config, level)
    # Prefill headroom for a surge like the largest one seen recently within a reaction time:
    # nothing ordered now serves sooner, and a prefill pool short of its load queues without
    # bound (where decode absorbs a surge as a longer step). Scale-down keeps it above the
    # window's peak too, or the next decision would buy it back.
    surge_p = 1.0 + min(
        demand_surge(history, now - config.surge_window_seconds, lead), config.max_surge_headroom
    )
    sizing = _Sizing(
        snapshot, metrics, config, capacity, mean_prompt_tokens(metrics), _kv_seconds(metrics, config)
    )

    def peaks(window: dict[Role, float]) -> dict[Role, float]:
        """The demand scale-down must hold: the window's peak, the rise expected over a start
        (a load turning upwards must not lose replicas it needs a start later), prefill surge."""
        peak = {role: _window_peak(history, role, now - window[role]) for role in ROLES}
        peak = {role: max(peak[role], level[role] + max(trend[role], 0.0) * lead) for role in ROLES}
        return {"prefill": peak["prefill"] * surge_p, "decode": peak["decode"]}

    def needs_down(peak: dict[Role, float]) -> dict[Role, int]:
        """Replicas that hold `peak` at the scale-down margin (the N-1 check)."""
        return sizing.replicas(peak, config.scale_down_margin, kv_target=config.kv_cache_target * 0.9)

    rising, falling = _direction_of_load(history, now, config, level, lead)
    # Flap damping guards against a load that comes back within the longer window: one replica
    # off and on again. A load that a base window shows `_SETTLED_SURPLUS` replicas below what
    # runs, and that no longer falls, has settled lower instead; holding the damped window's peak
    # then only keeps the surplus (on Azure x10, 9 prefill replicas for 12 minutes where 5 held).
    need_base = needs_down(peaks({role: config.scale_down_window_seconds for role in ROLES}))
    for role in ROLES:
        settled_lower = need_base[role] <= snapshot.role(role).current - _SETTLED_SURPLUS
        if settled_lower and not falling[role] and roles_state[role].damping > 1.0:
            released = {"damping": 1.0, "last_reversal_at": None}
            roles_state[role] = roles_state[role].model_copy(update=released)
    # Flap damping: a role that reversed recently must see a longer quiet window before going down.
    window = {role: config.scale_down_window_seconds * roles_state[role].damping for role in ROLES}
    peak = peaks(window)
    # Extrapolate rising demand over a replica start; at most +50%, a step is not a ramp.
    # A saturated pool's estimate already holds the queue's growth: no trend on top of it.
    gain_p = 0.0 if saturated_p else min(max(trend["prefill"], 0.0) * lead, _MAX_TREND_GAIN * demand.steady_p)
    forecast_p = demand.steady_p + gain_p
    # Headroom is capacity held, not load expected: the backlog projection keeps the forecast.
    headroom_p = max(forecast_p, offered_p * surge_p)
    forecast_d = demand.steady_d + min(max(trend["decode"], 0.0) * lead, _MAX_TREND_GAIN * demand.steady_d)
    backlog_p = _projected_backlog(
        snapshot, roles_state["prefill"], config, now, metrics, forecast_p, ready_capacity_p, queued_p
    )
    demand_p = headroom_p + backlog_p / config.backlog_drain_seconds
    demand_d = forecast_d + (demand.drain_d if snapshot.decode.pending == 0 else 0.0)

    need_up = sizing.replicas({"prefill": demand_p, "decode": demand_d})
    need_down = needs_down(peak)
    # What the load needs without its backlog: replicas above it may go once the backlog is gone.
    # Saturated: the offered rate, not the estimate that holds the queue's growth.
    need_steady = sizing.replicas({"prefill": offered_p if saturated_p else forecast_p, "decode": forecast_d})
    drained: dict[Role, bool] = {
        "prefill": queued_p <= ready_capacity_p * _DRAINED_QUEUE_SECONDS,
        "decode": not metrics.decode_requests_waiting,
    }
    violated = _slo_violated(metrics, config)

    desired: dict[Role, int] = {}
    reasons: dict[Role, str] = {}
    for role in ROLES:
        # No scale-down before a whole window of unbroken evidence exists.
        proven = now - metrics_since >= window[role]
        desired[role], reasons[role] = _stabilize(
            role,
            snapshot,
            roles_state[role],
            config,
            now,
            need_up[role],
            need_down[role] if proven else snapshot.role(role).current,
            violated[role],
            drained[role],
            rising[role],
        )
    desired, reasons, limited = apply_bounds(desired, reasons, need_up, config)

    new_roles: dict[Role, RoleState] = {}
    role_decisions: dict[Role, RoleDecision] = {}
    for role in ROLES:
        previous = snapshot.role(role).current
        direction = _direction(previous, desired[role])
        role_decisions[role] = RoleDecision(
            replicas=desired[role],
            previous=previous,
            needed=need_up[role],
            direction=direction,
            reason=reasons[role],
        )
        # Only a scale-up over a real backlog has a surplus to release once that backlog drained.
        steady_need = None if drained[role] else min(need_steady[role], desired[role])
        new_roles[role] = _advance_role_state(roles_state[role], direction, capacity[role], now, steady_need)

    inputs = {
        **demand.inputs,
        "prefill_forecast_tokens_per_second": forecast_p,
        "prefill_surge_ratio": surge_p,
        "decode_forecast_tokens_per_second": forecast_d,
        "prefill_demand_tokens_per_second": demand_p,
        "decode_demand_tokens_per_second": demand_d,
        "prefill_window_peak_tokens_per_second": peak["prefill"],
        "decode_window_peak_tokens_per_second": peak["decode"],
        "prefill_capacity_tokens_per_second": capacity["prefill"],
        "decode_capacity_tokens_per_second": capacity["decode"],
        "mean_prompt_tokens": sizing.mean_prompt,
        "kv_transfer_seconds": sizing.kv_seconds,
        "prefill_ready": float(snapshot.prefill.ready),
        "prefill_pending": float(snapshot.prefill.pending),
        "decode_ready": float(snapshot.decode.ready),
        "decode_pending": float(snapshot.decode.pending),
    }
    for name in ("ttft_seconds", "itl_seconds", "kv_cache_usage_ratio", "request_rate"):
        value = getattr(metrics, name)
        if value is not None:
            inputs[name] = value
    decision = Decision(
        at=now,
        prefill=role_decisions["prefill"],
        decode=role_decisions["decode"],
        limited=limited,
        reason=f"prefill: {reasons['prefill']}; decode: {reasons['decode']}",
        inputs=inputs,
    )
    new_state = PolicyState(
        prefill=new_roles["prefill"],
        decode=new_roles["decode"],
        demand_history=history,
        last_queued_prefill_tokens=metrics.queued_prefill_tokens,
        last_waiting_requests=demand.waiting_requests,
        last_prefill_ready=snapshot.prefill.ready,
        mean_output_tokens=demand.mean_output_tokens,
        last_metrics_at=now,
        metrics_since=metrics_since,
    )
    return decision, new_state


@dataclasses.dataclass(frozen=True)
class _Sizing:
    """One decision's replica formula: the same for scale-up, the N-1 check and the steady need."""

    snapshot: Snapshot
    metrics: MetricsSample
    config: PolicyConfig
    capacity: dict[Role, float]
    mean_prompt: float
    kv_seconds: float

    def replicas(
        self, demand: dict[Role, float], margin: float = 1.0, kv_target: float | None = None
    ) -> dict[Role, int]:
        """Replicas per role for `demand` tokens/s at the target utilizations times `margin`."""
        c = self.config
        prefill = prefill_replicas_needed(
            demand["prefill"], self.capacity["prefill"], self.mean_prompt, self.kv_seconds, c,
            c.prefill_target_utilization * margin,
        )  # fmt: skip
        decode = decode_replicas_needed(
            demand["decode"], self.capacity["decode"], c.decode_target_utilization * margin
        )
        return {
            "prefill": prefill,
            "decode": max(decode, kv_cache_replicas(self.metrics, self.snapshot, c, kv_target)),
        }


def _kv_seconds(metrics: MetricsSample, config: PolicyConfig) -> float:
    """KV transfer time as measured, else as configured."""
    if metrics.kv_transfer_seconds is not None:
        return metrics.kv_transfer_seconds
    return config.expected_kv_transfer_seconds


def _saturated_demand(
    demand: Demand,
    snapshot: Snapshot,
    state: PolicyState,
    config: PolicyConfig,
    capacity: dict[Role, float],
    queued_p: float,
) -> tuple[Demand, bool]:
    """Demand with a saturated prefill pool's step seen at once, and whether it is saturated.

    A queue worth more than the TTFT SLO of the pool's work (or a good part of an interval) means
    it ran flat out and misses TTFT. A saturated pool serves its capacity and the queue grows by
    the rest: this sees a step now, where the admitted-tokens rate averages it over a window.
    """
    ready_capacity_p = snapshot.prefill.ready * capacity["prefill"]
    queue_limit = min(config.interval_seconds * _SATURATED_SHARE, config.ttft_slo_seconds)
    if not (demand.saturated_p or queued_p > ready_capacity_p * queue_limit):
        return demand, False
    # Replicas that became ready since the last decision did not serve through the interval.
    served_by = min(snapshot.prefill.ready, state.last_prefill_ready or snapshot.prefill.ready)
    now_p = served_by * capacity["prefill"] + max(demand.growth_p, 0.0)
    return dataclasses.replace(demand, steady_p=max(demand.steady_p, now_p)), True


def _clear_trend(
    history: tuple[DemandSample, ...], now: float, config: PolicyConfig, level: dict[Role, float]
) -> dict[Role, float]:
    """Clear demand trends (tokens/s per second) per role.

    Decode load grows with arrivals (prompt tokens count at admission): generation rising faster
    than they do is a backlog flushed out of prefill, which ends, not a ramp to extrapolate (on the
    idle-then-spike trace, 26 decode replicas bought where 7 held the load after it).
    """
    trend_p, trend_d = demand_trend(history, now - config.trend_window_seconds)
    arrivals_growth = max(trend_p, 0.0) / level["prefill"] if level["prefill"] > 0 else 0.0
    return {"prefill": trend_p, "decode": min(trend_d, arrivals_growth * level["decode"])}


def _direction_of_load(
    history: tuple[DemandSample, ...], now: float, config: PolicyConfig, level: dict[Role, float], lead: float
) -> tuple[dict[Role, bool], dict[Role, bool]]:
    """(rising, falling) per role: any slope that moves the load over 5% within a start.

    Near the bottom of a wave the trend is not clear yet; a rise already holds scale-down (going
    down now would mean going up again a start later).
    """
    slope_p, slope_d = demand_trend(history, now - config.trend_window_seconds, clear_only=False)
    slope: dict[Role, float] = {"prefill": slope_p, "decode": slope_d}
    rising = {role: slope[role] * lead > _RISING_SHARE * level[role] for role in ROLES}
    falling = {role: slope[role] * lead < -_RISING_SHARE * level[role] for role in ROLES}
    return rising, falling


def _window_peak(history: tuple[DemandSample, ...], role: Role, since: float) -> float:
    key = "prefill_tokens_per_second" if role == "prefill" else "decode_tokens_per_second"
    return max(getattr(s, key) for s in history if s.at >= since)


def _projected_backlog(
    snapshot: Snapshot,
    prefill_state: RoleState,
    config: PolicyConfig,
    now: float,
    metrics: MetricsSample,
    forecast_p: float,
    ready_capacity_p: float,
    queued_p: float,
) -> float:
    """Prefill backlog (tokens) as it will be when the capacity asked for now serves.

    The queue keeps growing by (demand - ready capacity) until then, and all of it must drain
    within `backlog_drain_seconds`: one step to the target instead of +N per interval. Replicas
    already loading arrive earlier (at most a start after the last scale-up), so while some load
    the projection stops at their arrival: asking again for what they were sized for is how
    decisions pile up. The trend still counts: on a ramp some replica is always loading. Only
    where the queue is measured (without that gauge: what is known, no growth).
    """
    startup = config.replica_startup_seconds
    horizon = startup
    if snapshot.prefill.pending > 0:
        last_up = prefill_state.last_up_at
        horizon = startup if last_up is None else min(max(startup - (now - last_up), 0.0), startup)
    measured = metrics.queued_prefill_tokens is not None
    growth = (forecast_p - ready_capacity_p) * horizon if measured else 0.0
    return max(queued_p + growth, 0.0)


def _slo_violated(metrics: MetricsSample, config: PolicyConfig) -> dict[Role, bool]:
    """An SLO miss per role, counted only while its cause is still there (a backlog, or a full
    decode pool): a quantile over the window still shows a burst that has already drained."""
    decode_pressed = bool(metrics.decode_requests_waiting) or (
        metrics.kv_cache_usage_ratio is not None and metrics.kv_cache_usage_ratio > config.kv_cache_target
    )
    return {
        "prefill": metrics.ttft_seconds is not None
        and metrics.ttft_seconds > config.ttft_slo_seconds
        and (metrics.queued_prefill_tokens or 0.0) > 0,
        "decode": metrics.itl_seconds is not None
        and metrics.itl_seconds > config.itl_slo_seconds
        and decode_pressed,
    }


def reason_code(reason: str) -> str:
    """A low-cardinality label for a role's reason text (the `reason` of decisions_total)."""
    if "GPU budget" in reason:
        return "gpu_budget"
    if "ratio m" in reason:
        return "ratio_bound"
    if "clamped to" in reason:
        return "replica_bounds"
    if reason.startswith("hold: ") and "metrics" in reason:
        return "no_metrics"
    if "above SLO" in reason:
        return "slo_violation"
    if reason.startswith("hold: ") and "loading" in reason:
        return "replicas_loading"
    if reason.startswith("hold: "):
        return "cooldown"
    if reason.startswith(("up: ", "down: ")):
        return "load"
    return "steady"


def prefill_replicas_needed(
    demand_tokens_per_second: float,
    capacity_tokens_per_second: float,
    mean_prompt_tokens: float,
    kv_transfer_seconds: float,
    config: PolicyConfig,
    max_utilization: float,
) -> int:
    """Prefill replicas whose queueing delay at the SLO quantile fits the TTFT budget left.

    TTFT = queue wait + own prefill + KV transfer, so the wait may use what the other two leave.
    When nothing is left, fall back to plain throughput at `max_utilization` (SLO unreachable).
    """
    if demand_tokens_per_second <= 0:
        return 0
    service_seconds = mean_prompt_tokens / capacity_tokens_per_second
    wait_budget = config.ttft_slo_seconds - service_seconds - kv_transfer_seconds
    arrival_rate = demand_tokens_per_second / mean_prompt_tokens
    service_rate = 1.0 / service_seconds
    if wait_budget <= 0:
        return math.ceil(arrival_rate / (service_rate * max_utilization) - 1e-9)
    return servers_for_wait(arrival_rate, service_rate, config.quantile, wait_budget, max_utilization)


def decode_replicas_needed(
    demand_tokens_per_second: float, capacity_tokens_per_second: float, max_utilization: float
) -> int:
    """Decode replicas that make the demanded tokens/s, each loaded to at most `max_utilization`."""
    if demand_tokens_per_second <= 0:
        return 0
    return math.ceil(demand_tokens_per_second / (capacity_tokens_per_second * max_utilization) - 1e-9)


def apply_bounds(
    desired: dict[Role, int], reasons: dict[Role, str], need: dict[Role, int], config: PolicyConfig
) -> tuple[dict[Role, int], dict[Role, str], bool]:
    """Per-role min/max, then the prefill:decode ratio, then the GPU budget split by need."""
    out = dict(desired)
    why = dict(reasons)
    limited = False
    for role in ROLES:
        limits = config.limits(role)
        clamped = min(max(out[role], limits.min_replicas), limits.max_replicas)
        if clamped != out[role]:
            why[role] += f", clamped to [{limits.min_replicas}, {limits.max_replicas}]"
            limited = limited or clamped < out[role]
            out[role] = clamped

    p, d = out["prefill"], out["decode"]
    p_max, d_max = config.prefill.max_replicas, config.decode.max_replicas
    if config.ratio_max is not None and d > 0 and p / d > config.ratio_max:
        # Raise the short side first: a ratio bound must never cost SLO headroom.
        new_d = min(math.ceil(p / config.ratio_max - 1e-9), d_max)
        new_p = min(p, math.floor(new_d * config.ratio_max + 1e-9))
        why["decode"] += f", ratio max {config.ratio_max}" if new_d != d else ""
        why["prefill"] += f", ratio max {config.ratio_max}" if new_p != p else ""
        limited = limited or new_p < p
        p, d = new_p, new_d
    if config.ratio_min is not None and d > 0 and p / d < config.ratio_min:
        new_p = min(math.ceil(d * config.ratio_min - 1e-9), p_max)
        new_d = min(d, math.floor(new_p / config.ratio_min + 1e-9))
        why["prefill"] += f", ratio min {config.ratio_min}" if new_p != p else ""
        why["decode"] += f", ratio min {config.ratio_min}" if new_d != d else ""
        limited = limited or new_d < d
        p, d = new_p, new_d
    out = {"prefill": p, "decode": d}

    if config.gpu_budget is not None and _gpus(out, config) > config.gpu_budget:
        out = _split_budget(out, need, config)
        for role in ROLES:
            if out[role] != desired[role]:
                why[role] += f", GPU budget {config.gpu_budget}"
        limited = True
    return out, why, limited


def _split_budget(desired: dict[Role, int], need: dict[Role, int], config: PolicyConfig) -> dict[Role, int]:
    """Fill the budget from the minimums up, each GPU to the role whose need is least met."""
    alloc: dict[Role, int] = {role: config.limits(role).min_replicas for role in ROLES}
    while True:
        candidates = [
            role
            for role in ROLES
            if alloc[role] < desired[role]
            and _gpus(alloc, config) + config.limits(role).gpus_per_replica <= (config.gpu_budget or 0)
        ]
        if not candidates:
            return alloc
        role = min(candidates, key=lambda r: (alloc[r] / max(need[r], desired[r], 1), r))
        alloc[role] += 1


def _gpus(replicas: dict[Role, int], config: PolicyConfig) -> int:
    return sum(replicas[role] * config.limits(role).gpus_per_replica for role in ROLES)


def _stabilize(
    role: Role,
    snapshot: Snapshot,
    role_state: RoleState,
    config: PolicyConfig,
    now: float,
    need_up: int,
    need_down: int,
    violated: bool,
    drained: bool,
    rising: bool,
) -> tuple[int, str]:
    """Fast up, slow and proven down; pending replicas already count as capacity."""
    replicas = snapshot.role(role)
    current = replicas.current
    since_change = math.inf if role_state.last_change_at is None else now - role_state.last_change_at
    metric = "TTFT" if role == "prefill" else "ITL"

    if violated and replicas.pending == 0 and need_up <= current and since_change >= config.interval_seconds:
        # The capacity model says enough, the SLO says no: trust the SLO, learning catches up.
        need_up = current + 1
        up_reason = f"{metric} above SLO with no replica loading"
    else:
        up_reason = f"load needs {need_up} (have {current}, {replicas.pending} loading)"

    if need_up > current:
        if role_state.last_direction == "up" and since_change < config.scale_up_cooldown_seconds:
            return (
                current,
                f"hold: scale-up cooldown ({since_change:.0f}s < {config.scale_up_cooldown_seconds:.0f}s)",
            )
        return min(need_up, current + config.max_step_up), f"up: {up_reason}"

    if need_down < current:
        if violated:
            return current, f"hold: {metric} above SLO"
        if replicas.pending > 0:
            return current, f"hold: {replicas.pending} replica(s) still loading"
        since_up = math.inf if role_state.last_up_at is None else now - role_state.last_up_at
        cooldown = config.scale_down_cooldown_seconds * role_state.damping
        if since_up < cooldown:
            # Replicas added only to drain a backlog are not needed once it has drained: the
            # cooldown protects the steady need of the last scale-up, not the surplus for the burst.
            steady = role_state.steady_need_at_up
            surplus = current - max(need_down, 0 if steady is None else steady)
            if drained and steady is not None and surplus >= max(2, steady * _BURST_SURPLUS):
                target = max(need_down, steady)
                return target, f"down: backlog drained, {target} hold the load (needs {need_down})"
            return current, f"hold: {since_up:.0f}s since scale-up < {cooldown:.0f}s"
        if rising:
            return current, "hold: demand rising"
        if since_change < config.scale_down_step_seconds:
            return (
                current,
                f"hold: {since_change:.0f}s since last step < {config.scale_down_step_seconds:.0f}s",
            )
        step = max(1, math.floor(current * config.max_step_down_fraction))
        target = max(need_down, current - step)
        window = config.scale_down_window_seconds * role_state.damping
        return target, f"down: {target} hold the {window:.0f}s peak (needs {need_down})"
    return current, f"steady: load needs {need_up}, have {current}"


def _metrics_problem(metrics: MetricsSample | None, config: PolicyConfig, now: float) -> str | None:
    """Why the snapshot cannot be acted on, or None when it can."""
    if metrics is None:
        return "no metrics"
    age = now - metrics.observed_at
    if age > config.max_metric_age_seconds:
        return f"metrics stale ({age:.0f}s old > {config.max_metric_age_seconds:.0f}s)"
    missing = [
        name
        for name in ("prompt_tokens_per_second", "generation_tokens_per_second")
        if getattr(metrics, name) is None
    ]
    if missing:
        return f"missing metrics: {', '.join(missing)}"
    return None


def _hold(snapshot: Snapshot, config: PolicyConfig, now: float, problem: str) -> Decision:
    """Keep what runs (within bounds): missing data must never scale anything to zero."""
    roles: dict[Role, RoleDecision] = {}
    for role in ROLES:
        limits = config.limits(role)
        current = snapshot.role(role).current
        replicas = min(max(current, limits.min_replicas), limits.max_replicas)
        roles[role] = RoleDecision(
            replicas=replicas,
            previous=current,
            needed=current,
            direction=_direction(current, replicas),
            reason=f"hold: {problem}",
        )
    return Decision(
        at=now, prefill=roles["prefill"], decode=roles["decode"], hold=True, reason=f"hold: {problem}"
    )


def _trim_history(history: tuple[DemandSample, ...], since: float) -> tuple[DemandSample, ...]:
    return tuple(s for s in history if s.at >= since)


def _direction(previous: int, replicas: int) -> Direction:
    if replicas > previous:
        return "up"
    if replicas < previous:
        return "down"
    return "none"


def _advance_role_state(
    old: RoleState, direction: Direction, capacity: float, now: float, steady_need: int | None
) -> RoleState:
    if direction == "none":
        return old.model_copy(update={"capacity_tokens_per_second": capacity})
    reversed_ = old.last_direction not in ("none", direction)
    # Going back up after a scale-down means the scale-down was premature: damp the next one.
    regretted = reversed_ and direction == "up"
    return RoleState(
        capacity_tokens_per_second=capacity,
        last_change_at=now,
        last_up_at=now if direction == "up" else old.last_up_at,
        last_direction=direction,
        num_reversals=old.num_reversals + int(reversed_),
        damping=min(old.damping * 2, _MAX_DAMPING) if regretted else old.damping,
        last_reversal_at=now if regretted else old.last_reversal_at,
        # Only a scale-up sets what the cooldown protects; a scale-down ends that.
        steady_need_at_up=steady_need if direction == "up" else None,
    )


def _decay_damping(role_state: RoleState, config: PolicyConfig, now: float) -> RoleState:
    """Damping halves for every `damping_decay_seconds` without a regretted scale-down."""
    if role_state.damping <= 1.0 or role_state.last_reversal_at is None:
        return role_state
    if now - role_state.last_reversal_at < config.damping_decay_seconds:
        return role_state
    return role_state.model_copy(
        update={"damping": max(role_state.damping / 2, 1.0), "last_reversal_at": now}
    )
