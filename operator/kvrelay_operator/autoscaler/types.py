"""Data the autoscaler policy consumes and produces: snapshot, config, state, decision.

Everything is a pydantic model so it round-trips through JSON (CR status, decision log, replay).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["prefill", "decode"]
Direction = Literal["up", "down", "none"]
ROLES: tuple[Role, Role] = ("prefill", "decode")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MetricsSample(_Frozen):
    """Pool-level metrics over one window, as read from Prometheus (None = series absent)."""

    observed_at: float = Field(description="Unix time of the newest worker sample behind this snapshot.")
    window_seconds: float = Field(60.0, gt=0, description="Rate/quantile window the values cover.")
    ttft_seconds: float | None = Field(None, ge=0, description="TTFT at the SLO quantile (router).")
    itl_seconds: float | None = Field(None, ge=0, description="Inter-token latency at the SLO quantile.")
    mean_itl_seconds: float | None = Field(
        None, ge=0, description="Mean inter-token latency over the window (decode capacity learns from it)."
    )
    request_rate: float | None = Field(None, ge=0, description="Requests per second accepted by the router.")
    prompt_tokens_per_second: float | None = Field(None, ge=0, description="Prompt tokens/s prefilled.")
    generation_tokens_per_second: float | None = Field(None, ge=0, description="Tokens/s generated.")
    queued_prefill_tokens: float | None = Field(None, ge=0, description="Prompt tokens waiting, all prefill.")
    prefill_requests_waiting: float | None = Field(None, ge=0)
    decode_requests_waiting: float | None = Field(None, ge=0)
    decode_requests_running: float | None = Field(None, ge=0)
    kv_cache_usage_ratio: float | None = Field(None, ge=0, description="Mean KV-cache use of decode workers.")
    kv_cache_usage_mean_ratio: float | None = Field(
        None, ge=0, description="Each decode worker's mean KV-cache use over the window, averaged."
    )
    kv_cache_usage_peak_ratio: float | None = Field(
        None, ge=0, description="Each decode worker's highest KV-cache use in the window, averaged."
    )
    kv_transfer_seconds: float | None = Field(None, ge=0, description="Mean KV transfer time per request.")
    prefill_queue_seconds: float | None = Field(
        None, ge=0, description="Prefill wait from arrival to first scheduled step at the SLO quantile."
    )
    prefill_busy_seconds_per_second: float | None = Field(
        None, ge=0, description="rate(prefill_seconds_sum) summed over the prefill pool (busy replicas)."
    )
    prefill_requests_waiting_for_replicas: float | None = Field(
        None, ge=0, description="Requests the router held for a ready prefill replica in the window (most)."
    )
    decode_requests_waiting_for_replicas: float | None = Field(
        None, ge=0, description="Requests the router held for a ready decode replica in the window (most)."
    )

    def waiting_for_replicas(self, role: Role) -> float:
        """Requests held at the router for a ready replica of `role` (scaled to zero); 0 when unknown."""
        value = getattr(self, f"{role}_requests_waiting_for_replicas")
        return value or 0.0


class RoleReplicas(_Frozen):
    """Replica counts of one role as the cluster reports them."""

    current: int = Field(ge=0, description="Replicas currently asked for (ready + still loading).")
    ready: int = Field(ge=0, description="Replicas serving traffic.")

    @property
    def pending(self) -> int:
        """Replicas asked for but not ready yet: capacity that is already on its way."""
        return max(self.current - self.ready, 0)


class Snapshot(_Frozen):
    """Everything one decision looks at: metrics (None when Prometheus had nothing) and replicas."""

    metrics: MetricsSample | None
    prefill: RoleReplicas
    decode: RoleReplicas

    def role(self, role: Role) -> RoleReplicas:
        """The replica counts of `role`."""
        return self.prefill if role == "prefill" else self.decode


class RoleLimits(_Frozen):
    """Per-role bounds and the GPUs one replica takes (tensorParallel)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(16, ge=1)
    gpus_per_replica: int = Field(1, ge=1)
    capacity_basis: str = Field(
        "",
        max_length=64,
        description="Fingerprint of what a replica's capacity depends on (model, tensorParallel, batch "
        "limits, profile); a learned capacity is forgotten when it changes.",
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> RoleLimits:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}: lower min"
            )
        return self


class PolicyConfig(_Frozen):
    """Tuning of the policy; built from `spec.autoscaling` plus per-role bounds."""

    ttft_slo_seconds: float = Field(gt=0)
    itl_slo_seconds: float = Field(gt=0)
    quantile: float = Field(0.99, ge=0.5, lt=1.0)
    prefill: RoleLimits = RoleLimits()
    decode: RoleLimits = RoleLimits()
    ratio_min: float | None = Field(None, gt=0, description="Lowest prefill:decode replica ratio.")
    ratio_max: float | None = Field(None, gt=0, description="Highest prefill:decode replica ratio.")
    gpu_budget: int | None = Field(None, ge=1, description="Most GPUs both pools may hold together.")
    interval_seconds: float = Field(30.0, gt=0, description="Seconds between decisions.")
    scale_up_cooldown_seconds: float = Field(30.0, ge=0)
    scale_down_cooldown_seconds: float = Field(
        300.0, ge=0, description="No scale-down of a role this soon after it scaled up (no flapping)."
    )
    scale_down_window_seconds: float = Field(
        180.0, ge=0, description="Scale-down sizes for the highest demand seen in this window."
    )
    max_step_up: int = Field(32, ge=1, description="Most replicas one decision adds to a role.")
    backlog_drain_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "The part of the prefill backlog (projected to when new replicas serve) that the TTFT SLO "
            "cannot let wait is sized to drain this fast."
        ),
    )
    max_step_down_fraction: float = Field(
        0.34, gt=0, le=1, description="Most of a role's replicas one decision removes (at least one)."
    )
    scale_down_step_seconds: float = Field(60.0, ge=0, description="Least time between two scale-downs.")
    reversal_budget: int = Field(
        2,
        ge=0,
        description="Most direction reversals per role within `reversal_window_seconds`: a scale-down that "
        "turns after a scale-up waits until the window has room for it and for the scale-up that may follow.",
    )
    reversal_window_seconds: float = Field(3600.0, gt=0)
    damping_decay_seconds: float = Field(
        1800.0, gt=0, description="Flap damping halves after this long without a reversal."
    )
    trend_window_seconds: float = Field(
        180.0, ge=0, description="Rising demand is extrapolated over a replica start from this window."
    )
    surge_window_seconds: float = Field(
        1800.0,
        ge=0,
        description="Prefill keeps headroom for the largest rise within a reaction time seen this long.",
    )
    max_surge_headroom: float = Field(
        0.25,
        ge=0,
        description="Most prefill headroom a past surge buys, as a share of demand (0 turns it off).",
    )
    prefill_target_utilization: float = Field(
        0.95, gt=0, le=1, description="Highest planned prefill load; the TTFT queueing model binds first."
    )
    decode_target_utilization: float = Field(
        0.9, gt=0, le=1, description="Highest planned share of the learned decode capacity at the ITL SLO."
    )
    scale_down_margin: float = Field(
        0.88, gt=0, le=1, description="N-1 replicas must hold the window's peak at this share of the target."
    )
    kv_cache_target: float = Field(0.85, gt=0, le=1, description="Decode KV-cache use to plan for.")
    replica_startup_seconds: float = Field(
        90.0, gt=0, description="Typical time until a new replica is ready; backlogs drain over it."
    )
    prefill_tokens_per_second: float = Field(
        10_000.0, gt=0, description="Profile seed: prompt tokens/s one prefill replica sustains."
    )
    decode_tokens_per_second: float = Field(
        2_000.0, gt=0, description="Profile seed: tokens/s one decode replica makes at the ITL SLO."
    )
    decode_base_itl_fraction: float = Field(
        0.3, gt=0, lt=1, description="Idle decode step time as a fraction of the ITL SLO (profile)."
    )
    expected_kv_transfer_seconds: float = Field(0.02, ge=0)
    capacity_ewma_alpha: float = Field(0.3, gt=0, le=1)
    max_metric_age_seconds: float = Field(120.0, gt=0)
    learn_capacity: bool = True

    def limits(self, role: Role) -> RoleLimits:
        """Bounds of `role`."""
        return self.prefill if role == "prefill" else self.decode

    @model_validator(mode="after")
    def _consistent(self) -> PolicyConfig:
        if self.ratio_min is not None and self.ratio_max is not None and self.ratio_min > self.ratio_max:
            raise ValueError(f"ratio_min {self.ratio_min} > ratio_max {self.ratio_max}: swap or widen them")
        if self.gpu_budget is not None:
            floor = sum(self.limits(r).min_replicas * self.limits(r).gpus_per_replica for r in ROLES)
            if floor > self.gpu_budget:
                raise ValueError(f"gpu_budget {self.gpu_budget} < {floor} GPUs the role minimums need")
        return self


def interval_windows(interval_seconds: float) -> dict[str, float]:
    """The windows that scale with the decision interval: scale-down evidence spans six decisions,
    and two decisions pass between scale-downs (180 s and 60 s at the default 30 s interval)."""
    return {
        "interval_seconds": interval_seconds,
        "scale_down_window_seconds": 6.0 * interval_seconds,
        "scale_down_step_seconds": 2.0 * interval_seconds,
    }


class DemandSample(_Frozen):
    """Demand seen at one decision, kept for the scale-down window."""

    at: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float


class RoleState(_Frozen):
    """What the policy remembers about one role between decisions."""

    capacity_tokens_per_second: float | None = Field(None, description="Learned per-replica capacity.")
    capacity_basis: str | None = Field(
        None, description="The RoleLimits.capacity_basis it was learned under."
    )
    last_change_at: float | None = None
    last_up_at: float | None = None
    last_direction: Direction = "none"
    num_reversals: int = 0
    damping: float = Field(
        1.0, ge=1.0, description="Multiplies the scale-down window and cooldown; doubles per reversal."
    )
    last_reversal_at: float | None = None
    reversal_times: tuple[float, ...] = Field(
        (), description="When the role turned direction within the reversal window, oldest first."
    )
    steady_need_at_up: int | None = Field(
        None,
        description="Replicas the load without its backlog needed at the last scale-up: the rest may go "
        "once the backlog has drained, before the scale-down cooldown.",
    )


class PolicyState(_Frozen):
    """The policy's memory; the caller stores it and passes it back (no hidden globals)."""

    prefill: RoleState = RoleState()
    decode: RoleState = RoleState()
    demand_history: tuple[DemandSample, ...] = ()
    last_queued_prefill_tokens: float | None = None
    last_waiting_requests: float | None = None
    last_prefill_ready: int | None = Field(None, description="Ready prefill replicas at the last decision.")
    mean_output_tokens: float | None = Field(None, description="EWMA of generated tokens per request.")
    last_metrics_at: float | None = None
    metrics_since: float | None = Field(
        None, description="Start of the current unbroken run of usable metrics (scale-down needs a window)."
    )
    last_load_at: float | None = Field(
        None,
        description="Last decision that saw any load (requests held, queued or running, tokens made): "
        "a role goes to zero only a whole scale-down window after it.",
    )

    def role(self, role: Role) -> RoleState:
        """The remembered state of `role`."""
        return self.prefill if role == "prefill" else self.decode


class ReasonCode(StrEnum):
    """Why a role has the replicas it has, in few words: the `reason` label of decisions_total.

    The phase that had the last word sets it (stabilise, scale to zero, then bounds);
    `RoleDecision.reason` says the same for humans, with the numbers. Alerts match the bound codes
    (`limitedReasonRegex` in the chart's values), so a value never changes.
    """

    NO_METRICS = "no_metrics"  # metrics missing or stale: hold what runs
    LOAD = "load"  # up or down to what the load needs
    STEADY = "steady"  # what runs is what the load needs
    SLO_VIOLATION = "slo_violation"  # an SLO miss adds a replica or holds scale-down
    REPLICAS_LOADING = "replicas_loading"  # scale-down waits for replicas still starting
    COOLDOWN = "cooldown"  # a cooldown, step interval or rising demand holds the change
    REPLICA_BOUNDS = "replica_bounds"  # clamped to the role's min/max replicas
    RATIO_BOUND = "ratio_bound"  # moved by the prefill:decode ratio bounds
    GPU_BUDGET = "gpu_budget"  # cut to fit the GPU budget
    REQUESTS_WAITING = "requests_waiting"  # up from zero: requests wait at the router (scale_to_zero.py)
    IDLE = "idle"  # down to zero, or kept there: no load for a whole scale-down window


# Codes that say a bound cut or moved what stabilise proposed (the chart's alert matches these).
BOUND_CODES = frozenset({ReasonCode.REPLICA_BOUNDS, ReasonCode.RATIO_BOUND, ReasonCode.GPU_BUDGET})


class Proposal(_Frozen):
    """One role's replicas and why, between phases: what stabilise proposes and bounds may move."""

    replicas: int = Field(ge=0)
    reason: str
    code: ReasonCode

    def moved(self, replicas: int, note: str, code: ReasonCode) -> Proposal:
        """The same proposal moved by a bound: the bound's note appended, its code taking over."""
        return Proposal(replicas=replicas, reason=f"{self.reason}, {note}", code=code)


class RoleDecision(_Frozen):
    """The outcome for one role."""

    replicas: int
    previous: int
    needed: int = Field(description="Replicas the load calls for before bounds, caps and cooldowns.")
    direction: Direction
    reason: str = Field(description="Why, for humans: the phase's words and numbers.")
    code: ReasonCode = Field(description="Why, as a metric label: the same reason in one code.")


class Decision(_Frozen):
    """What to run, why, and the numbers it was decided from."""

    at: float
    prefill: RoleDecision
    decode: RoleDecision
    hold: bool = Field(False, description="True when metrics were missing or stale and nothing moved.")
    limited: bool = Field(False, description="True when a bound, the ratio or the GPU budget cut the need.")
    reason: str
    inputs: dict[str, float] = Field(default_factory=dict)

    def role(self, role: Role) -> RoleDecision:
        """The decision for `role`."""
        return self.prefill if role == "prefill" else self.decode
