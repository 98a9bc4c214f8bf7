"""Estimators behind the policy: demand, per-replica capacity, trend and KV-cache need (pure).

Each reads one metrics snapshot (and what the policy remembered) and returns numbers;
`policy.decide` turns them into replica counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvrelay_operator.autoscaler.types import (
    ROLES,
    DemandSample,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    Role,
    Snapshot,
)

# Below this share of busy time (prefill) or of the latency range (decode) an observation says
# little about capacity, so it is not learned from.
_MIN_INFORMATIVE_LOAD = 0.25
_MIN_INFORMATIVE_DECODE = 0.1
# One odd window must not move the learned capacity arbitrarily far from the profile.
_CAPACITY_CLAMP = 4.0
_DEFAULT_PROMPT_TOKENS = 1024.0
# Queued prompt tokens that mean "busy the whole window" rather than a request in flight.
_SATURATED_QUEUE_TOKENS = 4096.0


def learn_capacity(
    metrics: MetricsSample, snapshot: Snapshot, state: PolicyState, config: PolicyConfig, demand: Demand
) -> dict[Role, float]:
    """Per-replica capacity: the profile seed, corrected online by what the pools actually do.

    Prefill: when a backlog persisted through the window the pool ran flat out, so what it served
    per replica is its capacity; otherwise served tokens/s per replica over its busy share.
    Decode: with step time a + c*batch, ITL = a / (1 - c*x) at x tokens/s, so the capacity at the
    ITL SLO S is x * (1 - a/S) / (1 - a/L) for an observed ITL L (observed/expected correction).
    L is the window's mean, like x (under bursty load the quantile comes from the burst's batch and
    the rate from the whole window: pairing those learned a capacity 4x low on Azure's code trace),
    and S shrinks by the quantile's spread over the mean, which the SLO needs on top.
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
    # A replica that became ready inside the window served only part of it: skip that window.
    steady_pool = state.last_prefill_ready in (None, ready_p)
    if ready_p > 0 and demand.served_p > 0 and snapshot.prefill.pending == 0 and steady_pool:
        if demand.saturated_p:
            observed["prefill"] = demand.served_p / ready_p
        elif busy is not None and _MIN_INFORMATIVE_LOAD <= busy / ready_p <= 1.0:
            # prefill_seconds is per request: batched prefill over-counts busy time, which only
            # makes this estimate low (safe); a saturated window corrects it upwards.
            observed["prefill"] = demand.served_p / ready_p / (busy / ready_p)

    ready_d = snapshot.decode.ready
    quantile_itl, mean_itl = metrics.itl_seconds, metrics.mean_itl_seconds
    # Requests waiting for a decode slot inflate ITL with admission delay, not step time.
    queue_free = not metrics.decode_requests_waiting
    if ready_d > 0 and quantile_itl is not None and queue_free and metrics.generation_tokens_per_second:
        slo = config.itl_slo_seconds
        base = config.decode_base_itl_fraction * slo
        # The mean pairs with the rate; the quantile's spread over it is what the SLO needs on top.
        itl = mean_itl if mean_itl is not None else quantile_itl
        spread = max(quantile_itl / itl, 1.0) if itl > 0 else 1.0
        target = slo / spread
        if target > base and base + _MIN_INFORMATIVE_DECODE * (slo - base) <= itl <= 2 * slo:
            per_replica = metrics.generation_tokens_per_second / ready_d
            observed["decode"] = per_replica * (1 - base / target) / (1 - base / itl)

    alpha = config.capacity_ewma_alpha
    for role in ROLES:
        value = observed[role]
        if value is None:
            continue
        value = min(max(value, seeds[role] / _CAPACITY_CLAMP), seeds[role] * _CAPACITY_CLAMP)
        learned[role] = (1 - alpha) * learned[role] + alpha * value
    return learned


@dataclass(frozen=True)
class Demand:
    """Demand estimates of one decision (tokens/s) and what they were computed from."""

    steady_p: float
    served_p: float
    growth_p: float
    saturated_p: bool
    steady_d: float
    drain_d: float  # tokens/s that serve the requests waiting for a decode slot within a start
    waiting_requests: float
    mean_output_tokens: float | None
    inputs: dict[str, float]


def estimate_demand(metrics: MetricsSample, state: PolicyState, config: PolicyConfig, now: float) -> Demand:
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
    return Demand(
        steady_p=offered_p,
        served_p=served_p,
        saturated_p=saturated_p,
        growth_p=growth_q,
        steady_d=served_d + growth_w * per_request,
        drain_d=(metrics.decode_requests_waiting or 0.0) * per_request / config.replica_startup_seconds,
        waiting_requests=waiting,
        mean_output_tokens=mean_output,
        inputs=inputs,
    )


def demand_trend(
    history: tuple[DemandSample, ...], since: float, clear_only: bool = True
) -> tuple[float, float]:
    """Least-squares slope (tokens/s per s) of both demands in the window; 0 unless it is clear.

    A slope counts only when it moves demand by over 10% across the window and demand still
    rose over the last two intervals, so noise on a flat load or a past step does not add replicas.
    `clear_only=False` returns the plain slope (to hold scale-down while demand turns upwards).
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
        if not clear_only:
            out.append(slope)
            continue
        # Still rising over the last rate window too (two intervals, independent samples): a step
        # that went flat is not a ramp to extrapolate. The smaller of both slopes counts.
        recent_span = points[-1].at - points[-3].at
        recent = (values[-1] - values[-3]) / recent_span if recent_span > 0 else 0.0
        clear = slope > 0 and recent > 0 and slope * span > 0.1 * max(mean_v, 1e-9)
        out.append(min(slope, recent) if clear else 0.0)
    return out[0], out[1]


def demand_surge(history: tuple[DemandSample, ...], since: float, within_seconds: float) -> float:
    """Largest relative rise of prefill demand within `within_seconds` seen since `since`, less the
    rate's own noise (0 = none).

    Rates over overlapping windows are compared pairwise: a sample against every later one at
    most `within_seconds` on. A reaction time is what a rise like this one would take to answer.
    The noise is the median relative change between samples half that apart, twice: a load whose
    rate jitters by 10% between windows (heavy-tailed prompt lengths) has not surged when its
    highest window is 20% above its lowest, while a ramp's steps stand out of a flat median.
    """
    points = [s for s in history if s.at >= since]
    best = 0.0
    for i, start in enumerate(points):
        base = start.prefill_tokens_per_second
        if base <= 0:
            continue
        for later in points[i + 1 :]:
            if later.at - start.at > within_seconds:
                break
            best = max(best, later.prefill_tokens_per_second / base - 1.0)
    # Changes between samples half a reaction time apart, so that rates over overlapping windows
    # do not share most of their requests (neighbours would understate the jitter).
    changes = []
    for i, a in enumerate(points):
        later = next((b for b in points[i + 1 :] if b.at - a.at >= within_seconds / 2), None)
        if later is not None and a.prefill_tokens_per_second > 0:
            changes.append(abs(later.prefill_tokens_per_second / a.prefill_tokens_per_second - 1.0))
    changes.sort()
    noise = changes[len(changes) // 2] if changes else 0.0
    return max(best - 2.0 * noise, 0.0)


def kv_cache_replicas(
    metrics: MetricsSample,
    snapshot: Snapshot,
    config: PolicyConfig,
    target: float | None = None,
    peak: bool = False,
) -> int:
    """Decode replicas whose KV cache holds the running and the waiting sequences at the target use.

    Long contexts make decode memory-bound before it is bandwidth-bound: requests then wait for
    KV space, and tokens/s never shows the shortfall. Each running sequence holds usage * ready /
    running of a replica's cache; waiting ones will need as much.

    Scale-up reads the window's mean use (`peak` False): one scrape that caught a 100k-token prompt's
    cache is not a need that lasts (Mooncake conversation bought a third decode replica on one such
    scrape, and the reversal budget kept it for 50 minutes). The N-1 check of scale-down (`peak`
    True) reads the window's highest use: fewer replicas must hold that too. Without those series,
    the use now.
    """
    windowed = metrics.kv_cache_usage_peak_ratio if peak else metrics.kv_cache_usage_mean_ratio
    usage = metrics.kv_cache_usage_ratio if windowed is None else windowed
    if usage is None or snapshot.decode.ready == 0:
        return 0
    running = metrics.decode_requests_running or 0.0
    waiting = metrics.decode_requests_waiting or 0.0
    queued_share = 1.0 + waiting / running if running > 0 else 1.0
    return math.ceil(snapshot.decode.ready * usage * queued_share / (target or config.kv_cache_target) - 1e-9)


def mean_prompt_tokens(metrics: MetricsSample) -> float:
    """Prompt tokens per request (a default before any request finished)."""
    if metrics.request_rate and metrics.prompt_tokens_per_second:
        return max(metrics.prompt_tokens_per_second / metrics.request_rate, 1.0)
    return _DEFAULT_PROMPT_TOKENS


def kv_transfer_seconds(metrics: MetricsSample, config: PolicyConfig) -> float:
    """KV transfer time as measured, else as configured."""
    if metrics.kv_transfer_seconds is not None:
        return metrics.kv_transfer_seconds
    return config.expected_kv_transfer_seconds


def ttft_wait_budget(
    config: PolicyConfig, mean_prompt: float, capacity_tokens_per_second: float, kv_seconds: float
) -> float:
    """Seconds of the TTFT SLO a request may wait for a prefill replica: TTFT = queue wait + its own
    prefill + KV transfer, so the wait may use what the other two leave (<= 0: the SLO is unreachable)."""
    return config.ttft_slo_seconds - mean_prompt / capacity_tokens_per_second - kv_seconds
