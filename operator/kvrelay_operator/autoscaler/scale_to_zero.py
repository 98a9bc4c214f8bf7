"""Scale to zero and back (pure): a role whose minReplicas is 0 sleeps while the model has no load and
wakes as soon as requests wait for it.

Every request needs both roles, so the model's load is one thing: any of it (requests held at the
router, tokens made, requests running or queued on a worker) keeps or brings every role to at least
one replica, and a role goes to zero only after a whole scale-down window without any.

    metrics  ──with_zero_pools──►  a pool with no ready replica exports nothing: its rates read 0
    stabilise proposes 0 ──────►  load now?                 -> 1 (up from zero: requests_waiting)
                                   idle for a whole window?  -> 0 (idle)
                                   else                      -> keep the last replica (cooldown)

The bounds phase then applies minReplicas, the ratio and the GPU budget as for any proposal.
"""

from __future__ import annotations

from kvrelay_operator.autoscaler.types import (
    ROLES,
    DemandSample,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    Proposal,
    ReasonCode,
    Role,
    Snapshot,
)

# Worker rates the policy cannot act without, per role: a pool with no ready replica has no worker to
# export them, and Prometheus answers nothing rather than 0.
_RATE_OF_ROLE: dict[Role, str] = {
    "prefill": "prompt_tokens_per_second",
    "decode": "generation_tokens_per_second",
}


def with_zero_pools(snapshot: Snapshot) -> Snapshot:
    """The snapshot with a missing rate read as 0 for a role that has no ready replica: nothing serves
    there, so nothing was served (missing metrics would hold the policy at zero for good)."""
    metrics = snapshot.metrics
    if metrics is None:
        return snapshot
    fills = {
        name: 0.0
        for role, name in _RATE_OF_ROLE.items()
        if snapshot.role(role).ready == 0 and getattr(metrics, name) is None
    }
    if not fills:
        return snapshot
    return snapshot.model_copy(update={"metrics": metrics.model_copy(update=fills)})


def load_now(metrics: MetricsSample) -> str | None:
    """What load the model has now, in words, or None when it has none at all."""
    held = {role: metrics.waiting_for_replicas(role) for role in ROLES}
    if any(held.values()):
        roles = " and ".join(role for role in ROLES if held[role])
        return f"{max(held.values()):.0f} request(s) wait at the router for a {roles} replica"
    busy = {
        "prompt tokens/s": metrics.prompt_tokens_per_second,
        "generated tokens/s": metrics.generation_tokens_per_second,
        "requests running": metrics.decode_requests_running,
        "requests waiting": (metrics.prefill_requests_waiting or 0.0)
        + (metrics.decode_requests_waiting or 0.0),
        "queued prompt tokens": metrics.queued_prefill_tokens,
    }
    seen = [f"{value:.3g} {name}" for name, value in busy.items() if value]
    return ", ".join(seen) if seen else None


def last_load_at(state: PolicyState, metrics: MetricsSample, now: float) -> float | None:
    """When a decision last saw load (the policy remembers it: a request that ran for a while leaves
    no trace in the demand history's rates once it ends)."""
    return now if load_now(metrics) is not None else state.last_load_at


def idle_seconds(
    history: tuple[DemandSample, ...], last_load: float | None, metrics_since: float, now: float
) -> float:
    """How long the model has had no load: since the last decision that saw tokens made or anything held,
    queued or running, and at most since the metrics began (no evidence before that)."""
    busy = [s.at for s in history if s.prefill_tokens_per_second > 0 or s.decode_tokens_per_second > 0]
    if last_load is not None:
        busy.append(last_load)
    return now - max([metrics_since, *busy])


def to_and_from_zero(
    proposed: dict[Role, Proposal],
    snapshot: Snapshot,
    metrics: MetricsSample,
    history: tuple[DemandSample, ...],
    state: PolicyState,
    config: PolicyConfig,
    now: float,
    metrics_since: float,
) -> dict[Role, Proposal]:
    """Stabilise's proposals with the zero cases settled for roles whose minReplicas is 0: one proposed
    at 0 comes (or stays) up while the model has load, and goes to 0 only after a whole scale-down
    window without any."""
    load = load_now(metrics)
    idle = idle_seconds(history, state.last_load_at, metrics_since, now)
    window = config.scale_down_window_seconds
    out = dict(proposed)
    for role in ROLES:
        if proposed[role].replicas > 0 or config.limits(role).min_replicas > 0:
            continue  # the bounds phase keeps a role with minReplicas >= 1 at its minimum
        current = snapshot.role(role).current
        if load is not None and current == 0:
            out[role] = Proposal(replicas=1, reason=f"up from zero: {load}", code=ReasonCode.REQUESTS_WAITING)
        elif load is not None:
            verb = "hold: the last replica stays" if current == 1 else "down to 1: one replica stays"
            out[role] = Proposal(replicas=1, reason=f"{verb} while {load}", code=ReasonCode.COOLDOWN)
        elif current == 0:
            out[role] = Proposal(
                replicas=0, reason=f"steady: scaled to zero, no load for {idle:.0f}s", code=ReasonCode.IDLE
            )
        elif idle < window:
            why = f"hold: the last replica goes after {window:.0f}s without load ({idle:.0f}s so far)"
            out[role] = Proposal(replicas=current, reason=why, code=ReasonCode.COOLDOWN)
        else:
            out[role] = Proposal(
                replicas=0, reason=f"down to zero: no load for {idle:.0f}s", code=ReasonCode.IDLE
            )
    return out
