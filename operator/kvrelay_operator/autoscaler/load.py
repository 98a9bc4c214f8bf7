"""The demand phase: what the pools serve now and will have to serve when a replica asked for now does.

Pure, like the policy. From one metrics snapshot and the policy's memory: per-replica capacity
learned, demand per role (with a saturated prefill pool's step seen at once), its history, trend
and direction, prefill surge headroom, and the prefill backlog projected to when new replicas
serve. The needs phase sizes replicas from the `Load` this returns.
"""

from __future__ import annotations

import dataclasses
import math

from kvrelay_operator.autoscaler.estimators import (
    Demand,
    demand_surge,
    demand_trend,
    estimate_demand,
    kv_transfer_seconds,
    learn_capacity,
    mean_prompt_tokens,
    ttft_wait_budget,
)
from kvrelay_operator.autoscaler.queueing import wait_quantile
from kvrelay_operator.autoscaler.stabilize import MAX_DAMPING, up_locks_in
from kvrelay_operator.autoscaler.types import (
    ROLES,
    DemandSample,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    Role,
    RoleState,
    Snapshot,
)

# Rising demand is extrapolated over a start by at most this share: a step is not a ramp.
_MAX_TREND_GAIN = 0.5
# Queued prompt tokens worth this share of an interval of ready capacity: the pool ran saturated.
_SATURATED_SHARE = 0.25
# Demand rising by more than this share over a replica start holds scale-down.
_RISING_SHARE = 0.05


@dataclasses.dataclass(frozen=True)
class Load:
    """The demand phase's result: tokens/s per role, what is learned about them, and their direction."""

    demand: Demand  # the estimate, with a saturated prefill pool's step seen at once
    capacity: dict[Role, float]  # learned tokens/s one replica serves
    history: tuple[DemandSample, ...]  # offered demand over the longest window any phase looks at
    offered_p: float  # prompt tokens/s admitted (what history keeps)
    queued_p: float  # prompt tokens waiting
    ready_capacity_p: float  # tokens/s the ready prefill replicas serve
    saturated_p: bool  # the prefill pool ran flat out
    level: dict[Role, float]  # offered demand now
    trend: dict[Role, float]  # clear trend, tokens/s per second
    lead: float  # seconds until a replica asked for now serves
    rising: dict[Role, bool]
    falling: dict[Role, bool]
    surge_p: float  # prefill headroom factor for a surge like a recent one
    forecast: dict[Role, float]  # demand a start from now
    flush_d: float  # decode tokens/s the prefill backlog brings when new prefill replicas flush it
    absorbed_p: float  # prompt tokens of the projected backlog that may wait within the TTFT SLO
    sized: dict[Role, float]  # what scale-up sizes for: forecast, surge headroom, backlog drain

    def scale_down_peak(self, window: dict[Role, float], now: float) -> dict[Role, float]:
        """The demand scale-down must hold: the window's peak, the rise expected over a start
        (a load turning upwards must not lose replicas it needs a start later), prefill surge."""
        peak = {role: _window_peak(self.history, role, now - window[role]) for role in ROLES}
        lead, level, trend = self.lead, self.level, self.trend
        peak = {role: max(peak[role], level[role] + max(trend[role], 0.0) * lead) for role in ROLES}
        return {"prefill": peak["prefill"] * self.surge_p, "decode": peak["decode"]}


def estimate_load(
    snapshot: Snapshot,
    metrics: MetricsSample,
    state: PolicyState,
    roles_state: dict[Role, RoleState],
    config: PolicyConfig,
    now: float,
) -> Load:
    """Demand phase: capacity learned, demand now and a start ahead, and what scale-up sizes for."""
    demand = estimate_demand(metrics, state, config, now)
    capacity = learn_capacity(metrics, snapshot, state, config, demand)
    queued_p = metrics.queued_prefill_tokens or 0.0
    offered_p = demand.steady_p
    ready_capacity_p = snapshot.prefill.ready * capacity["prefill"]
    # A replica asked for now serves after a start and up to an interval; rates over a window lag
    # the load by half of it.
    lead = config.replica_startup_seconds + config.interval_seconds + metrics.window_seconds / 2
    demand, saturated_p = _saturated_demand(demand, snapshot, state, config, capacity, metrics, lead)
    # History (scale-down window, trend) keeps the offered rate: the saturated estimate above
    # overstates while replicas that just became ready are counted as if they served all along.
    sample = DemandSample(
        at=now, prefill_tokens_per_second=offered_p, decode_tokens_per_second=demand.steady_d
    )
    longest = max(config.scale_down_window_seconds * MAX_DAMPING, config.surge_window_seconds)
    history = (*_trim_history(state.demand_history, now - longest), sample)
    level: dict[Role, float] = {"prefill": offered_p, "decode": demand.steady_d}
    trend = _clear_trend(history, now, config, level)
    # Prefill headroom for a surge like the largest one seen recently within a reaction time:
    # nothing ordered now serves sooner, and a prefill pool short of its load queues without
    # bound (where decode absorbs a surge as a longer step). Scale-down keeps it above the
    # window's peak too, or the next decision would buy it back.
    surge_p = 1.0 + min(
        demand_surge(history, now - config.surge_window_seconds, lead), config.max_surge_headroom
    )
    rising, falling = _direction_of_load(history, now, config, level, lead)
    # Extrapolate rising demand over a replica start; at most +50%, a step is not a ramp.
    # A saturated pool's estimate already holds the queue's growth: no trend on top of it.
    gain_p = 0.0 if saturated_p else min(max(trend["prefill"], 0.0) * lead, _MAX_TREND_GAIN * demand.steady_p)
    forecast_p = demand.steady_p + gain_p
    # Headroom is capacity held, not load expected: the backlog projection keeps the forecast. A
    # replica added where the reversal budget then forbids turning down is held for up to an hour:
    # buy it for the load, not for a surge that may not come.
    prefill_state = roles_state["prefill"]
    locked = up_locks_in(prefill_state, config, now)
    headroom_p = forecast_p if locked else max(forecast_p, offered_p * surge_p)
    forecast_d = demand.steady_d + min(max(trend["decode"], 0.0) * lead, _MAX_TREND_GAIN * demand.steady_d)
    backlog_p = _projected_backlog(
        snapshot, prefill_state, config, now, metrics, forecast_p, ready_capacity_p, queued_p
    )
    # What a pool sized for the load holds queued within the TTFT SLO may wait; only the rest drains.
    absorbed_p = min(absorbed_backlog(headroom_p, capacity["prefill"], metrics, config), backlog_p)
    backlog_p -= absorbed_p
    # The flush is over within a drain: a decode scale-up for it that the budget would lock in is not
    # worth an hour (on Azure code's bursts, 0.5% of the GPU-hours at the median of six draws).
    flush_d = 0.0
    if not up_locks_in(roles_state["decode"], config, now):
        flush_d = _flush_rate(backlog_p, demand, metrics, config, capacity["prefill"], forecast_p)
    return Load(
        demand=demand,
        capacity=capacity,
        history=history,
        offered_p=offered_p,
        queued_p=queued_p,
        ready_capacity_p=ready_capacity_p,
        saturated_p=saturated_p,
        level=level,
        trend=trend,
        lead=lead,
        rising=rising,
        falling=falling,
        surge_p=surge_p,
        forecast={"prefill": forecast_p, "decode": forecast_d},
        flush_d=flush_d,
        absorbed_p=absorbed_p,
        sized={
            "prefill": headroom_p + _backlog_rate(backlog_p, queued_p, metrics, capacity["prefill"], config),
            "decode": forecast_d + demand.drain_d + flush_d,
        },
    )


def _saturated_demand(
    demand: Demand,
    snapshot: Snapshot,
    state: PolicyState,
    config: PolicyConfig,
    capacity: dict[Role, float],
    metrics: MetricsSample,
    lead: float,
) -> tuple[Demand, bool]:
    """Demand with a saturated prefill pool's step seen at once, and whether it is saturated.

    A queue worth more than the TTFT SLO of the pool's work (or a good part of an interval) means
    it ran flat out. A saturated pool serves its capacity and the queue grows by the rest: this
    sees a step now, where the admitted-tokens rate averages it over a window. It counts only
    where the queue breaks the SLO: grown at its rate until replicas asked for now serve, drained
    at the ready pool's rate, and added to the quantile wait of the load on that pool (the
    queueing model), it outlasts what TTFT leaves for waiting. On a 15 s SLO a few long prompts
    in the queue are no step (Mooncake conversation: 9 replicas bought, and kept by the reversal
    budget, where 6-7 held the load).
    """
    queued_p = metrics.queued_prefill_tokens or 0.0
    ready_capacity_p = snapshot.prefill.ready * capacity["prefill"]
    queue_limit = min(config.interval_seconds * _SATURATED_SHARE, config.ttft_slo_seconds)
    if not (demand.saturated_p or queued_p > ready_capacity_p * queue_limit):
        return demand, False
    if ready_capacity_p > 0:
        backlog_wait = (queued_p + max(demand.growth_p, 0.0) * lead) / ready_capacity_p
        ready_p = snapshot.prefill.ready
        if backlog_wait <= queue_wait_slack(ready_p, demand.steady_p, capacity["prefill"], metrics, config):
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

    The queue keeps growing by (demand - ready capacity) until then, and what the TTFT SLO cannot let
    wait (`absorbed_backlog`) must drain within `backlog_drain_seconds`: one step to the target
    instead of +N per interval. Replicas already loading arrive earlier (at most a start after the
    last scale-up), so while some load the projection stops at their arrival: asking again for what
    they were sized for is how decisions pile up. The trend still counts: on a ramp some replica is
    always loading. Only where the queue is measured (without that gauge: what is known, no growth).
    """
    startup = config.replica_startup_seconds
    horizon = startup
    if snapshot.prefill.pending > 0:
        last_up = prefill_state.last_up_at
        horizon = startup if last_up is None else min(max(startup - (now - last_up), 0.0), startup)
    measured = metrics.queued_prefill_tokens is not None
    growth = (forecast_p - ready_capacity_p) * horizon if measured else 0.0
    return max(queued_p + growth, 0.0)


def absorbed_backlog(
    demand_p: float, capacity_p: float, metrics: MetricsSample, config: PolicyConfig
) -> float:
    """Queued prompt tokens a prefill pool sized for `demand_p` holds without missing TTFT.

    A queue of Q tokens in front of a pool serving C tokens/s makes the next request wait Q / C; the
    wait may use what the TTFT wait budget leaves over the queueing model's quantile wait of the
    load itself. On a 15 s SLO that is seconds of the pool's work (a backlog queues instead of
    buying replicas to drain it in `backlog_drain_seconds`); on a 1.5 s SLO near a full pool, little.
    """
    if demand_p <= 0 or capacity_p <= 0:
        return 0.0
    servers = math.ceil(demand_p / (capacity_p * config.prefill_target_utilization) - 1e-9)
    return max(queue_wait_slack(servers, demand_p, capacity_p, metrics, config), 0.0) * servers * capacity_p


def queue_wait_slack(
    servers: int, demand_p: float, capacity_p: float, metrics: MetricsSample, config: PolicyConfig
) -> float:
    """Seconds a queued backlog may add to a request's wait on `servers` prefill replicas: the TTFT
    wait budget less the queueing model's quantile wait of `demand_p` itself (-inf when overloaded)."""
    mean_prompt = mean_prompt_tokens(metrics)
    budget = ttft_wait_budget(config, mean_prompt, capacity_p, kv_transfer_seconds(metrics, config))
    return budget - wait_quantile(servers, demand_p / mean_prompt, capacity_p / mean_prompt, config.quantile)


def _backlog_rate(
    backlog_p: float, queued_p: float, metrics: MetricsSample, capacity_p: float, config: PolicyConfig
) -> float:
    """Tokens/s that drain the projected backlog within `backlog_drain_seconds`, where the queue
    can use them: one prompt is prefilled by one replica, so the waiting requests drain no faster
    than one replica each (a single 100k-token prompt in the queue does not call for ten replicas).
    """
    rate = backlog_p / config.backlog_drain_seconds
    waiting = metrics.prefill_requests_waiting
    if waiting is not None and waiting >= 1 and queued_p > 0:  # (no count where it disagrees)
        rate -= max(queued_p / config.backlog_drain_seconds - waiting * capacity_p, 0.0)
    return max(rate, 0.0)


def _flush_rate(
    backlog_p: float,
    demand: Demand,
    metrics: MetricsSample,
    config: PolicyConfig,
    capacity_p: float,
    forecast_p: float,
) -> float:
    """Decode tokens/s the prefill backlog brings when it is flushed.

    Scale-up sizes prefill to drain the backlog projected to when new replicas serve within
    `backlog_drain_seconds`, so decode receives those requests at that pace, on top of the load: on
    a x3 step, sizing decode for the load alone left the flush to 3 replicas, which missed ITL for
    90 s. No faster than the largest prefill pool allowed drains it beside the load; a backlog the
    ready prefill pool clears before then reaches decode before replicas asked for now could serve
    it, and adds nothing.
    """
    largest_pool = config.prefill.max_replicas * capacity_p
    prompt_tokens = min(backlog_p / config.backlog_drain_seconds, max(largest_pool - forecast_p, 0.0))
    return prompt_tokens / mean_prompt_tokens(metrics) * (demand.mean_output_tokens or 0.0)


def _trim_history(history: tuple[DemandSample, ...], since: float) -> tuple[DemandSample, ...]:
    return tuple(s for s in history if s.at >= since)
