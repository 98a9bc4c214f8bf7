"""The policy's memory in `status.autoscaler.state`, and what of it an operator that restarts continues from.

Pure (no clock, no client): `to_status` rounds and shapes a `PolicyState` for the CR's status,
`from_status` reads it back, `restore` drops what a new process must not trust. Times are unix
seconds (wall clock), so they mean the same in every operator process.

What survives a restart, and why:
- learned capacity per role and mean output tokens: properties of the model, the hardware and
  the workload, not of the process;
- per-role moves (last change, last scale-up, direction, reversals and their times, damping):
  cooldowns, the reversal budget and damping decay are measured from these times, so a long
  outage simply lets them expire;
- demand history: the policy trims it to its own longest window by time on the next decision,
  so an old history ages out by itself; what is left still informs surge headroom and trend;
- the previous observation (queue, waiting requests, ready prefill replicas, its time): estimators
  take rates and "saturated at both ends" from it, so it is kept only while it is no older than
  the policy accepts metrics to be (`max_metric_age_seconds`), as if one decision was late;
- never `metrics_since` (not even written): the run of unbroken metrics ends with the process, so
  after any restart scale-down waits for a fresh window, as after a gap in the metrics (and a
  role at minReplicas 0 goes to zero only a whole window after it: idle time starts there too).
"""

from __future__ import annotations

from collections.abc import Callable

from kvrelay_operator import api
from kvrelay_operator.autoscaler.types import DemandSample, PolicyConfig, PolicyState, RoleState

# Unix times to the millisecond; everything else to six significant digits (a learned capacity moves
# by far more between two decisions). Keeps a state with a full history to a few KiB of JSON.
TIME_DECIMALS = 3
SIGNIFICANT_DIGITS = 6


def to_status(state: PolicyState) -> api.AutoscalerState:
    """The persisted parts of `state`, rounded (the newest MAX_DEMAND_SAMPLES samples of history)."""
    history = state.demand_history[-api.MAX_DEMAND_SAMPLES :]
    demand = None
    if history:
        start = _time(history[0].at)
        demand = api.DemandHistoryState(
            start=start,
            offsets_seconds=[round(_time(s.at) - start, TIME_DECIMALS) for s in history],
            prefill_tokens_per_second=[_value(s.prefill_tokens_per_second) for s in history],
            decode_tokens_per_second=[_value(s.decode_tokens_per_second) for s in history],
        )
    return api.AutoscalerState(
        prefill=_role_to_status(state.prefill),
        decode=_role_to_status(state.decode),
        demand_history=demand,
        mean_output_tokens=_maybe(_value, state.mean_output_tokens),
        last_metrics_at=_maybe(_time, state.last_metrics_at),
        last_queued_prefill_tokens=_maybe(_value, state.last_queued_prefill_tokens),
        last_waiting_requests=_maybe(_value, state.last_waiting_requests),
        last_prefill_ready=state.last_prefill_ready,
        last_load_at=_maybe(_time, state.last_load_at),
    )


def from_status(saved: api.AutoscalerState) -> PolicyState:
    """The PolicyState `saved` holds, as written (no run of unbroken metrics: `metrics_since` unset)."""
    demand = saved.demand_history
    history: tuple[DemandSample, ...] = ()
    if demand is not None:
        history = tuple(
            DemandSample(at=_time(demand.start + dt), prefill_tokens_per_second=p, decode_tokens_per_second=d)
            for dt, p, d in zip(
                demand.offsets_seconds,
                demand.prefill_tokens_per_second,
                demand.decode_tokens_per_second,
                strict=True,
            )
        )
    return PolicyState(
        prefill=_role_from_status(saved.prefill),
        decode=_role_from_status(saved.decode),
        demand_history=history,
        mean_output_tokens=saved.mean_output_tokens,
        last_metrics_at=saved.last_metrics_at,
        last_queued_prefill_tokens=saved.last_queued_prefill_tokens,
        last_waiting_requests=saved.last_waiting_requests,
        last_prefill_ready=saved.last_prefill_ready,
        last_load_at=saved.last_load_at,
    )


def restore(saved: api.AutoscalerState, now: float, config: PolicyConfig) -> PolicyState:
    """The state an operator without memory of this model continues from at `now` (module docstring)."""
    state = from_status(saved)
    last = state.last_metrics_at
    if last is None or now - last > config.max_metric_age_seconds:
        state = state.model_copy(
            update={
                "last_metrics_at": None,
                "last_queued_prefill_tokens": None,
                "last_waiting_requests": None,
                "last_prefill_ready": None,
            }
        )
    return state


def _role_to_status(role: RoleState) -> api.AutoscalerRoleState:
    return api.AutoscalerRoleState(
        capacity_tokens_per_second=_maybe(_value, role.capacity_tokens_per_second),
        capacity_basis=role.capacity_basis,
        last_change_at=_maybe(_time, role.last_change_at),
        last_up_at=_maybe(_time, role.last_up_at),
        last_direction=role.last_direction,
        num_reversals=role.num_reversals,
        damping=_value(role.damping),
        last_reversal_at=_maybe(_time, role.last_reversal_at),
        reversal_times=[_time(t) for t in role.reversal_times[-api.MAX_REVERSALS :]],
        steady_need_at_up=role.steady_need_at_up,
    )


def _role_from_status(saved: api.AutoscalerRoleState) -> RoleState:
    return RoleState(
        capacity_tokens_per_second=saved.capacity_tokens_per_second,
        capacity_basis=saved.capacity_basis,
        last_change_at=saved.last_change_at,
        last_up_at=saved.last_up_at,
        last_direction=saved.last_direction,
        num_reversals=saved.num_reversals,
        damping=saved.damping,
        last_reversal_at=saved.last_reversal_at,
        reversal_times=tuple(saved.reversal_times),
        steady_need_at_up=saved.steady_need_at_up,
    )


def _time(t: float) -> float:
    return round(t, TIME_DECIMALS)


def _value(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def _maybe(rounding: Callable[[float], float], x: float | None) -> float | None:
    return None if x is None else rounding(x)
