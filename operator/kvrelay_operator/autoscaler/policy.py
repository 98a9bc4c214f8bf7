"""The SLO autoscaling policy: `decide(snapshot, state, config, now) -> (Decision, new_state)`.

Pure: no clock, no I/O, no kubernetes/kopf/torch. One decision reads as:
check metrics -> learn per-replica capacity -> estimate demand -> replicas the SLOs need
-> stabilise (fast up, proven N-1 down, cooldowns, step caps) -> bounds, ratio, GPU budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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

# Below this share of busy time (prefill) or of the latency range (decode) an observation says
# little about capacity, so it is not learned from.
_MIN_INFORMATIVE_LOAD = 0.25
_MIN_INFORMATIVE_DECODE = 0.1
# One odd window must not move the learned capacity arbitrarily far from the profile.
_CAPACITY_CLAMP = 4.0
_DEFAULT_PROMPT_TOKENS = 1024.0
_MAX_TREND_GAIN = 0.5
_MAX_DAMPING = 4.0
# Queued prompt tokens that mean "busy the whole window" rather than a request in flight.
_SATURATED_QUEUE_TOKENS = 4096.0


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

    demand = _demand(metrics, state, config, now)
    capacity = _learn_capacity(metrics, snapshot, state, config, demand)
    if demand.saturated_p:
        # A saturated pool serves its capacity; the queue grows by the rest. This sees a step
        # at once, where the admitted-tokens rate averages it over the whole rate window.
        now_p = snapshot.prefill.ready * capacity["prefill"] + max(demand.growth_p, 0.0)
        demand = dataclasses.replace(demand, steady_p=max(demand.steady_p, now_p))
    sample = DemandSample(
        at=now, prefill_tokens_per_second=demand.steady_p, decode_tokens_per_second=demand.steady_d
    )
    longest = config.scale_down_window_seconds * _MAX_DAMPING
    history = (*_trim_history(state.demand_history, now - longest), sample)
    roles_state = {role: _decay_damping(state.role(role), config, now) for role in ROLES}
    # Flap damping: a role that reversed recently must see a longer quiet window before going down.
    window = {role: config.scale_down_window_seconds * roles_state[role].damping for role in ROLES}
    peak_p = max(s.prefill_tokens_per_second for s in history if s.at >= now - window["prefill"])
    peak_d = max(s.decode_tokens_per_second for s in history if s.at >= now - window["decode"])
    lead = config.replica_startup_seconds + config.interval_seconds
    trend = _trend(history, now - config.trend_window_seconds)
    # Extrapolate rising demand over a replica start; at most +50%, a step is not a ramp.
    forecast_p = demand.steady_p + min(max(trend[0], 0.0) * lead, _MAX_TREND_GAIN * demand.steady_p)
    forecast_d = demand.steady_d + min(max(trend[1], 0.0) * lead, _MAX_TREND_GAIN * demand.steady_d)
    # Replicas already loading were sized to drain the backlog; asking for that again every
    # interval while they load is how decisions pile up. The trend still counts: on a ramp some
    # replica is always loading, and ignoring the trend then means always arriving late.
    demand_p = forecast_p + (demand.drain_p if snapshot.prefill.pending == 0 else 0.0)
    demand_d = forecast_d + (demand.drain_d if snapshot.decode.pending == 0 else 0.0)

    mean_prompt = _mean_prompt_tokens(metrics)
    kv_seconds = (
        metrics.kv_transfer_seconds
        if metrics.kv_transfer_seconds is not None
        else config.expected_kv_transfer_seconds
    )
    need_up: dict[Role, int] = {
        "prefill": prefill_replicas_needed(
            demand_p, capacity["prefill"], mean_prompt, kv_seconds, config, config.prefill_target_utilization
        ),
        "decode": max(
            decode_replicas_needed(demand_d, capacity["decode"], config.decode_target_utilization),
            _kv_cache_replicas(metrics, snapshot, config),
        ),
    }
    need_down: dict[Role, int] = {
        "prefill": prefill_replicas_needed(
            peak_p,
            capacity["prefill"],
            mean_prompt,
            kv_seconds,
            config,
            config.prefill_target_utilization * config.scale_down_margin,
        ),
        "decode": max(
            decode_replicas_needed(
                peak_d, capacity["decode"], config.decode_target_utilization * config.scale_down_margin
            ),
            _kv_cache_replicas(metrics, snapshot, config, target=config.kv_cache_target * 0.9),
        ),
    }
    # An SLO miss counts only while its cause is still there (a backlog, or a full decode pool):
    # a quantile over the window still shows a burst that has already drained.
    decode_pressed = bool(metrics.decode_requests_waiting) or (
        metrics.kv_cache_usage_ratio is not None and metrics.kv_cache_usage_ratio > config.kv_cache_target
    )
    violated: dict[Role, bool] = {
        "prefill": metrics.ttft_seconds is not None
        and metrics.ttft_seconds > config.ttft_slo_seconds
        and (metrics.queued_prefill_tokens or 0.0) > 0,
        "decode": metrics.itl_seconds is not None
        and metrics.itl_seconds > config.itl_slo_seconds
        and decode_pressed,
    }

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
        new_roles[role] = _advance_role_state(roles_state[role], direction, capacity[role], now)

    inputs = {
        **demand.inputs,
        "prefill_forecast_tokens_per_second": forecast_p,
        "decode_forecast_tokens_per_second": forecast_d,
        "prefill_demand_tokens_per_second": demand_p,
        "decode_demand_tokens_per_second": demand_d,
        "prefill_window_peak_tokens_per_second": peak_p,
        "decode_window_peak_tokens_per_second": peak_d,
        "prefill_capacity_tokens_per_second": capacity["prefill"],
        "decode_capacity_tokens_per_second": capacity["decode"],
        "mean_prompt_tokens": mean_prompt,
        "kv_transfer_seconds": kv_seconds,
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
        mean_output_tokens=demand.mean_output_tokens,
        last_metrics_at=now,
        metrics_since=metrics_since,
    )
    return decision, new_state


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
            return current, f"hold: {since_up:.0f}s since scale-up < {cooldown:.0f}s"
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


def _learn_capacity(
    metrics: MetricsSample, snapshot: Snapshot, state: PolicyState, config: PolicyConfig, demand: _Demand
) -> dict[Role, float]:
    """Per-replica capacity: the profile seed, corrected online by what the pools actually do.

    Prefill: when a backlog persisted through the window the pool ran flat out, so what it served
    per replica is its capacity; otherwise served tokens/s per replica over its busy share.
    Decode: with step time a + c*batch, ITL = a / (1 - c*x) at x tokens/s, so the capacity at the
    ITL SLO S is x * (1 - a/S) / (1 - a/L) for an observed ITL L (observed/expected correction).
    """
    seeds: dict[Role, float] = {
        "prefill": config.prefill_tokens_per_second,
        "decode": config.decode_tokens_per_second,
    }
    learned = {role: state.role(role).capacity_tokens_per_second or seeds[role] for role in ROLES}
    if not config.learn_capacity:
        return learned

    observed: dict[Role, float | None] = {"prefill": None, "decode": None}
    ready_p = snapshot.prefill.ready
    busy = metrics.prefill_busy_seconds_per_second
    if ready_p > 0 and demand.served_p > 0 and snapshot.prefill.pending == 0:
        if demand.saturated_p:
            observed["prefill"] = demand.served_p / ready_p
        elif busy is not None and _MIN_INFORMATIVE_LOAD <= busy / ready_p <= 1.0:
            # prefill_seconds is per request: batched prefill over-counts busy time, which only
            # makes this estimate low (safe); a saturated window corrects it upwards.
            observed["prefill"] = demand.served_p / ready_p / (busy / ready_p)

    ready_d = snapshot.decode.ready
    itl = metrics.itl_seconds
    # Requests waiting for a decode slot inflate ITL with admission delay, not step time.
    queue_free = not metrics.decode_requests_waiting
    if ready_d > 0 and itl is not None and queue_free and metrics.generation_tokens_per_second:
        slo = config.itl_slo_seconds
        base = config.decode_base_itl_fraction * slo
        if base + _MIN_INFORMATIVE_DECODE * (slo - base) <= itl <= 2 * slo:
            per_replica = metrics.generation_tokens_per_second / ready_d
            observed["decode"] = per_replica * (1 - base / slo) / (1 - base / itl)

    alpha = config.capacity_ewma_alpha
    for role in ROLES:
        value = observed[role]
        if value is None:
            continue
        value = min(max(value, seeds[role] / _CAPACITY_CLAMP), seeds[role] * _CAPACITY_CLAMP)
        learned[role] = (1 - alpha) * learned[role] + alpha * value
    return learned


@dataclass(frozen=True)
class _Demand:
    steady_p: float
    served_p: float
    growth_p: float
    saturated_p: bool
    steady_d: float
    drain_p: float
    drain_d: float
    waiting_requests: float
    mean_output_tokens: float | None
    inputs: dict[str, float]


def _demand(metrics: MetricsSample, state: PolicyState, config: PolicyConfig, now: float) -> _Demand:
    """Demand in tokens/s, what serving it would take to drain backlogs, and what was served.

    Prefill workers count prompt tokens when they admit a request, so their rate is the offered
    load even when the pool is saturated; what was computed is that minus the queue's growth.
    Decode counts tokens as made, so a saturated decode pool hides demand: waiting requests
    (prefill's too: they reach decode next) and their growth add their expected output.
    """
    offered_p = metrics.prompt_tokens_per_second or 0.0
    served_d = metrics.generation_tokens_per_second or 0.0
    dt = None if state.last_metrics_at is None else now - state.last_metrics_at
    queued = metrics.queued_prefill_tokens or 0.0
    growth_q = 0.0
    last_q = state.last_queued_prefill_tokens
    if dt and dt > 0 and last_q is not None:
        growth_q = (queued - last_q) / dt
    served_p = max(offered_p - growth_q, 0.0)
    # A backlog at both ends of the window: the pool never idled in between.
    saturated_p = last_q is not None and min(queued, last_q) > _SATURATED_QUEUE_TOKENS

    mean_output = state.mean_output_tokens
    if metrics.request_rate and served_d > 0:
        observed = served_d / metrics.request_rate
        alpha = config.capacity_ewma_alpha
        mean_output = observed if mean_output is None else (1 - alpha) * mean_output + alpha * observed
    waiting = (metrics.prefill_requests_waiting or 0.0) + (metrics.decode_requests_waiting or 0.0)
    growth_w = 0.0
    if dt and dt > 0 and state.last_waiting_requests is not None:
        growth_w = max((waiting - state.last_waiting_requests) / dt, 0.0)
    per_request = mean_output or 0.0
    inputs = {
        "prompt_tokens_per_second": offered_p,
        "prefill_served_tokens_per_second": served_p,
        "generation_tokens_per_second": served_d,
        "queued_prefill_tokens": queued,
        "waiting_requests": waiting,
        "mean_output_tokens": per_request,
    }
    return _Demand(
        steady_p=offered_p,
        served_p=served_p,
        saturated_p=saturated_p,
        growth_p=growth_q,
        steady_d=served_d + growth_w * per_request,
        drain_p=queued / config.replica_startup_seconds,
        drain_d=waiting * per_request / config.replica_startup_seconds,
        waiting_requests=waiting,
        mean_output_tokens=mean_output,
        inputs=inputs,
    )


def _trend(history: tuple[DemandSample, ...], since: float) -> tuple[float, float]:
    """Least-squares slope (tokens/s per s) of both demands in the window; 0 unless it is clear.

    A slope counts only when it moves demand by over 10% across the window and demand still
    rose in the last interval, so noise on a flat load or a past step does not add replicas.
    """
    points = [s for s in history if s.at >= since]
    if len(points) < 3:
        return 0.0, 0.0
    mean_t = sum(s.at for s in points) / len(points)
    var_t = sum((s.at - mean_t) ** 2 for s in points)
    span = points[-1].at - points[0].at
    if var_t <= 0 or span <= 0:
        return 0.0, 0.0
    out = []
    for values in (
        [s.prefill_tokens_per_second for s in points],
        [s.decode_tokens_per_second for s in points],
    ):
        mean_v = sum(values) / len(values)
        slope = sum((s.at - mean_t) * (v - mean_v) for s, v in zip(points, values, strict=True)) / var_t
        # Still rising in the last interval too: a step that went flat is not a ramp to extrapolate.
        rising = values[-1] > values[-2]
        out.append(slope if rising and abs(slope) * span > 0.1 * max(mean_v, 1e-9) else 0.0)
    return out[0], out[1]


def _kv_cache_replicas(
    metrics: MetricsSample, snapshot: Snapshot, config: PolicyConfig, target: float | None = None
) -> int:
    """Decode replicas whose KV cache holds the running and the waiting sequences at the target use.

    Long contexts make decode memory-bound before it is bandwidth-bound: requests then wait for
    KV space, and tokens/s never shows the shortfall. Each running sequence holds usage * ready /
    running of a replica's cache; waiting ones will need as much.
    """
    usage = metrics.kv_cache_usage_ratio
    if usage is None or snapshot.decode.ready == 0:
        return 0
    running = metrics.decode_requests_running or 0.0
    waiting = metrics.decode_requests_waiting or 0.0
    queued_share = 1.0 + waiting / running if running > 0 else 1.0
    return math.ceil(snapshot.decode.ready * usage * queued_share / (target or config.kv_cache_target) - 1e-9)


def _mean_prompt_tokens(metrics: MetricsSample) -> float:
    if metrics.request_rate and metrics.prompt_tokens_per_second:
        return max(metrics.prompt_tokens_per_second / metrics.request_rate, 1.0)
    return _DEFAULT_PROMPT_TOKENS


def _trim_history(history: tuple[DemandSample, ...], since: float) -> tuple[DemandSample, ...]:
    return tuple(s for s in history if s.at >= since)


def _direction(previous: int, replicas: int) -> Direction:
    if replicas > previous:
        return "up"
    if replicas < previous:
        return "down"
    return "none"


def _advance_role_state(old: RoleState, direction: Direction, capacity: float, now: float) -> RoleState:
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
