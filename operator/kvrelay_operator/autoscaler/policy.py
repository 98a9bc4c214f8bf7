"""The SLO autoscaling policy: `decide(snapshot, state, config, now) -> (Decision, new_state)`.

Pure: no clock, no I/O, no kubernetes/kopf/torch. One decision reads as five phases:

    metrics usable? --no--> hold what runs (ReasonCode.NO_METRICS)
        |
    demand     (load.py)          learn per-replica capacity, demand now, its trend and surge
        |                         headroom, the backlog when new replicas serve
    needs      (_replicas_needed) replicas the SLOs need: up now, down only for a proven window
        |
    stabilise  (stabilize.py)     fast up, proven N-1 down, cooldowns, step caps, flap damping
        |
    zero       (scale_to_zero.py) minReplicas 0: up from zero on load, to zero after an idle window
        |
    bounds     (bounds.py)        per-role min/max, prefill:decode ratio, GPU budget
        |
    Decision (replicas, reason text and ReasonCode per role) + the next PolicyState
"""

from __future__ import annotations

import dataclasses
import math

from kvrelay_operator.autoscaler.bounds import apply_bounds, within_limits
from kvrelay_operator.autoscaler.estimators import (
    kv_cache_replicas,
    kv_transfer_seconds,
    mean_prompt_tokens,
    ttft_wait_budget,
)
from kvrelay_operator.autoscaler.load import Load, estimate_load
from kvrelay_operator.autoscaler.queueing import servers_for_wait
from kvrelay_operator.autoscaler.scale_to_zero import last_load_at, to_and_from_zero, with_zero_pools
from kvrelay_operator.autoscaler.stabilize import (
    RoleNeed,
    advance_role_state,
    decay_damping,
    release_settled_damping,
    stabilize,
)
from kvrelay_operator.autoscaler.types import (
    ROLES,
    Decision,
    Direction,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    Proposal,
    ReasonCode,
    Role,
    RoleDecision,
    RoleState,
    Snapshot,
)

# A prefill queue below this many seconds of ready capacity counts as drained.
_DRAINED_QUEUE_SECONDS = 0.5
# A TTFT miss adds a replica only over a queue that takes at least this share of the TTFT SLO to
# drain at the ready pool's rate: shorter queues are not what makes the quantile miss.
_VIOLATION_QUEUE_SHARE = 0.1


def decide(
    snapshot: Snapshot, state: PolicyState, config: PolicyConfig, now: float
) -> tuple[Decision, PolicyState]:
    """Decide desired prefill and decode replicas from one metrics snapshot (phases: module docstring)."""
    state = rebase_capacity(state, config)
    snapshot = with_zero_pools(snapshot)
    metrics = snapshot.metrics
    problem = _metrics_problem(metrics, config, now)
    if problem is not None or metrics is None:
        # A gap breaks the evidence for scale-down: the window starts again after it.
        return _hold(snapshot, config, now, problem or "no metrics"), state.model_copy(
            update={"metrics_since": None}
        )
    metrics_since = now if state.metrics_since is None else state.metrics_since
    roles_state = {role: decay_damping(state.role(role), config, now) for role in ROLES}

    # demand
    load = estimate_load(snapshot, metrics, state, roles_state, config, now)
    # needs
    sizing = _Sizing(
        snapshot,
        metrics,
        config,
        load.capacity,
        mean_prompt_tokens(metrics),
        kv_transfer_seconds(metrics, config),
    )
    roles_state = _release_settled_damping(roles_state, snapshot, load, sizing, config, now)
    needs = _replicas_needed(snapshot, metrics, load, sizing, roles_state, config, now, metrics_since)
    # stabilise
    proposed = {
        role: stabilize(role, snapshot.role(role), roles_state[role], config, now, needs.role(role))
        for role in ROLES
    }
    # scale to zero (minReplicas 0): up from zero on load, down to zero after an idle window
    proposed = to_and_from_zero(proposed, snapshot, metrics, load.history, state, config, now, metrics_since)
    # bounds
    bounded, limited = apply_bounds(proposed, needs.up, config)

    decision = _decision(snapshot, metrics, load, sizing, needs, bounded, limited, now)
    new_state = _next_state(snapshot, metrics, load, needs, roles_state, decision, metrics_since, now, config)
    return decision, new_state.model_copy(update={"last_load_at": last_load_at(state, metrics, now)})


def rebase_capacity(state: PolicyState, config: PolicyConfig) -> PolicyState:
    """Forget a role's learned capacity once what a replica is changed under it (tensorParallel, the
    model, its batch limits, a new profile): the profile seed is then a better guess than a capacity
    learned on other hardware or another model. A state from before bases were kept adopts the current
    one and keeps what it learned."""
    roles = {}
    for role in ROLES:
        old, basis = state.role(role), config.limits(role).capacity_basis
        if not basis or old.capacity_basis == basis:  # no basis given (a bare PolicyConfig): nothing to track
            continue
        forget = old.capacity_basis is not None
        roles[role] = old.model_copy(
            update={"capacity_basis": basis, **({"capacity_tokens_per_second": None} if forget else {})}
        )
    return state.model_copy(update=roles) if roles else state


@dataclasses.dataclass(frozen=True)
class _Needs:
    """The needs phase's result: replicas per role the SLOs call for, and the evidence around them."""

    up: dict[Role, int]  # for the demand with headroom and backlog, now
    down: dict[Role, int]  # holding the (damped) window's peak; what runs until a window is proven
    steady: dict[Role, int]  # for the load without its backlog
    peak: dict[Role, float]  # the demand scale-down holds
    violated: dict[Role, bool]
    drained: dict[Role, bool]
    rising: dict[Role, bool]

    def role(self, role: Role) -> RoleNeed:
        """What stabilise needs to know about `role`."""
        return RoleNeed(
            up=self.up[role],
            down=self.down[role],
            violated=self.violated[role],
            drained=self.drained[role],
            rising=self.rising[role],
        )


def _replicas_needed(
    snapshot: Snapshot,
    metrics: MetricsSample,
    load: Load,
    sizing: _Sizing,
    roles_state: dict[Role, RoleState],
    config: PolicyConfig,
    now: float,
    metrics_since: float,
) -> _Needs:
    """Needs phase: replicas for the demand now (up), for the window's peak at the N-1 margin
    (down, only after a whole window of unbroken metrics), and for the load without its backlog."""
    # Flap damping: a role that reversed recently must see a longer quiet window before going down.
    window = {role: config.scale_down_window_seconds * roles_state[role].damping for role in ROLES}
    peak = load.scale_down_peak(window, now)
    need_down = sizing.replicas_down(peak)
    # No scale-down before a whole window of unbroken evidence exists.
    proven = {role: now - metrics_since >= window[role] for role in ROLES}
    # What the load needs without its backlog: replicas above it may go once the backlog is gone.
    # Saturated: the offered rate, not the estimate that holds the queue's growth.
    steady_p = load.offered_p if load.saturated_p else load.forecast["prefill"]
    return _Needs(
        up=sizing.replicas(load.sized),
        down={role: need_down[role] if proven[role] else snapshot.role(role).current for role in ROLES},
        steady=sizing.replicas({"prefill": steady_p, "decode": load.forecast["decode"]}),
        peak=peak,
        violated=_slo_violated(metrics, config, load),
        drained={
            "prefill": load.queued_p <= load.ready_capacity_p * _DRAINED_QUEUE_SECONDS,
            "decode": not metrics.decode_requests_waiting,
        },
        rising=load.rising,
    )


def _release_settled_damping(
    roles_state: dict[Role, RoleState],
    snapshot: Snapshot,
    load: Load,
    sizing: _Sizing,
    config: PolicyConfig,
    now: float,
) -> dict[Role, RoleState]:
    """Flap damping ended where a base (undamped) window shows the load settled lower."""
    base_window = {role: config.scale_down_window_seconds for role in ROLES}
    need_base = sizing.replicas_down(load.scale_down_peak(base_window, now))
    return {
        role: release_settled_damping(
            roles_state[role], need_base[role], snapshot.role(role).current, load.falling[role]
        )
        for role in ROLES
    }


def _decision(
    snapshot: Snapshot,
    metrics: MetricsSample,
    load: Load,
    sizing: _Sizing,
    needs: _Needs,
    bounded: dict[Role, Proposal],
    limited: bool,
    now: float,
) -> Decision:
    """The bounded proposals as a Decision, with the numbers they were decided from."""
    roles: dict[Role, RoleDecision] = {}
    for role in ROLES:
        previous = snapshot.role(role).current
        roles[role] = RoleDecision(
            replicas=bounded[role].replicas,
            previous=previous,
            needed=needs.up[role],
            direction=_direction(previous, bounded[role].replicas),
            reason=bounded[role].reason,
            code=bounded[role].code,
        )
    inputs = {
        **load.demand.inputs,
        "prefill_forecast_tokens_per_second": load.forecast["prefill"],
        "prefill_surge_ratio": load.surge_p,
        "decode_forecast_tokens_per_second": load.forecast["decode"],
        "decode_flush_tokens_per_second": load.flush_d,
        "prefill_backlog_held_tokens": load.absorbed_p,
        "prefill_demand_tokens_per_second": load.sized["prefill"],
        "decode_demand_tokens_per_second": load.sized["decode"],
        "prefill_window_peak_tokens_per_second": needs.peak["prefill"],
        "decode_window_peak_tokens_per_second": needs.peak["decode"],
        "prefill_capacity_tokens_per_second": load.capacity["prefill"],
        "decode_capacity_tokens_per_second": load.capacity["decode"],
        "mean_prompt_tokens": sizing.mean_prompt,
        "kv_transfer_seconds": sizing.kv_seconds,
        "prefill_ready": float(snapshot.prefill.ready),
        "prefill_pending": float(snapshot.prefill.pending),
        "decode_ready": float(snapshot.decode.ready),
        "decode_pending": float(snapshot.decode.pending),
    }
    for name in (
        "ttft_seconds",
        "prefill_queue_seconds",
        "itl_seconds",
        "mean_itl_seconds",
        "kv_cache_usage_ratio",
        "kv_cache_usage_mean_ratio",
        "kv_cache_usage_peak_ratio",
        "request_rate",
    ):
        value = getattr(metrics, name)
        if value is not None:
            inputs[name] = value
    return Decision(
        at=now,
        prefill=roles["prefill"],
        decode=roles["decode"],
        limited=limited,
        reason=f"prefill: {roles['prefill'].reason}; decode: {roles['decode'].reason}",
        inputs=inputs,
    )


def _next_state(
    snapshot: Snapshot,
    metrics: MetricsSample,
    load: Load,
    needs: _Needs,
    roles_state: dict[Role, RoleState],
    decision: Decision,
    metrics_since: float,
    now: float,
    config: PolicyConfig,
) -> PolicyState:
    """What the policy remembers for the next decision."""
    new_roles = {
        # Only a scale-up over a real backlog has a surplus to release once that backlog drained.
        role: advance_role_state(
            roles_state[role],
            decision.role(role).direction,
            load.capacity[role],
            now,
            None if needs.drained[role] else min(needs.steady[role], decision.role(role).replicas),
            config.reversal_window_seconds,
            sleep_cycle=decision.role(role).previous == 0
            or (needs.down[role] == 0 and config.limits(role).min_replicas == 0),
        )
        for role in ROLES
    }
    return PolicyState(
        prefill=new_roles["prefill"],
        decode=new_roles["decode"],
        demand_history=load.history,
        last_queued_prefill_tokens=metrics.queued_prefill_tokens,
        last_waiting_requests=load.demand.waiting_requests,
        last_prefill_ready=snapshot.prefill.ready,
        mean_output_tokens=load.demand.mean_output_tokens,
        last_metrics_at=now,
        metrics_since=metrics_since,
    )


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
        self,
        demand: dict[Role, float],
        margin: float = 1.0,
        kv_target: float | None = None,
        kv_peak: bool = False,
    ) -> dict[Role, int]:
        """Replicas per role for `demand` tokens/s at the target utilizations times `margin`, and for
        the KV cache's use (the window's peak use where `kv_peak`, else its mean)."""
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
            "decode": max(decode, kv_cache_replicas(self.metrics, self.snapshot, c, kv_target, kv_peak)),
        }

    def replicas_down(self, peak: dict[Role, float]) -> dict[Role, int]:
        """Replicas that hold `peak` at the scale-down margin (the N-1 check)."""
        c = self.config
        return self.replicas(peak, c.scale_down_margin, kv_target=c.kv_cache_target * 0.9, kv_peak=True)


def _slo_violated(metrics: MetricsSample, config: PolicyConfig, load: Load) -> dict[Role, bool]:
    """An SLO miss per role, counted only while its cause is still there and replicas can remove
    it: a prefill queue that takes a real share of the TTFT SLO to drain, or a full decode pool.

    A quantile over the window still shows a burst that has already drained; and a TTFT miss over
    a short queue comes from prompts whose own prefill outlasts the SLO (Mooncake's 100k-token
    prompts), which no added replica shortens. So does a miss that the TTFT quantile less the
    prefill queue wait's quantile still shows: what is left is prefill and transfer time.
    """
    queue_wait = load.queued_p / load.ready_capacity_p if load.ready_capacity_p > 0 else math.inf
    queue_quantile = metrics.prefill_queue_seconds
    decode_pressed = bool(metrics.decode_requests_waiting) or (
        metrics.kv_cache_usage_ratio is not None and metrics.kv_cache_usage_ratio > config.kv_cache_target
    )
    return {
        "prefill": metrics.ttft_seconds is not None
        and metrics.ttft_seconds > config.ttft_slo_seconds
        and (metrics.queued_prefill_tokens or 0.0) > 0
        and queue_wait > _VIOLATION_QUEUE_SHARE * config.ttft_slo_seconds
        and (queue_quantile is None or metrics.ttft_seconds - queue_quantile <= config.ttft_slo_seconds),
        "decode": metrics.itl_seconds is not None
        and metrics.itl_seconds > config.itl_slo_seconds
        and decode_pressed,
    }


def prefill_replicas_needed(
    demand_tokens_per_second: float,
    capacity_tokens_per_second: float,
    mean_prompt_tokens: float,
    kv_transfer_seconds: float,
    config: PolicyConfig,
    max_utilization: float,
) -> int:
    """Prefill replicas whose queueing delay at the SLO quantile fits the TTFT wait budget
    (`estimators.ttft_wait_budget`). When nothing is left, fall back to plain throughput at
    `max_utilization` (SLO unreachable).
    """
    if demand_tokens_per_second <= 0:
        return 0
    service_seconds = mean_prompt_tokens / capacity_tokens_per_second
    wait_budget = ttft_wait_budget(
        config, mean_prompt_tokens, capacity_tokens_per_second, kv_transfer_seconds
    )
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
        current = snapshot.role(role).current
        replicas = within_limits(role, current, config)
        roles[role] = RoleDecision(
            replicas=replicas,
            previous=current,
            needed=current,
            direction=_direction(current, replicas),
            reason=f"hold: {problem}",
            code=ReasonCode.NO_METRICS,
        )
    return Decision(
        at=now, prefill=roles["prefill"], decode=roles["decode"], hold=True, reason=f"hold: {problem}"
    )


def _direction(previous: int, replicas: int) -> Direction:
    if replicas > previous:
        return "up"
    if replicas < previous:
        return "down"
    return "none"
