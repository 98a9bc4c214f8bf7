"""The stabilise phase: from the replicas the load needs to the replicas one decision proposes.

Pure, like the policy. Fast up (step caps, an up cooldown); slow and proven down (cooldowns,
one step at a time, flap damping that doubles the scale-down window after a regretted step).
Pending replicas already count as capacity. Each outcome carries its `ReasonCode`.
"""

from __future__ import annotations

import dataclasses
import math

from kvrelay_operator.autoscaler.types import (
    Direction,
    PolicyConfig,
    Proposal,
    ReasonCode,
    Role,
    RoleReplicas,
    RoleState,
)

# Flap damping never stretches the scale-down window and cooldown beyond this factor.
MAX_DAMPING = 4.0
# Replicas above the steady need released early once a backlog drained: only a real burst's
# surplus (at least this share of the steady need, and two replicas), not queueing noise.
_BURST_SURPLUS = 0.25
# A scale-down that turns after a scale-up (spending the reversal budget) waits for at least this
# share of the role's replicas to be spare.
_REVERSAL_SURPLUS = 0.25
# Replicas a base scale-down window must show surplus (a flap is one) for a settled load to end
# flap damping.
_SETTLED_SURPLUS = 2


@dataclasses.dataclass(frozen=True)
class RoleNeed:
    """What the needs phase found for one role."""

    up: int  # replicas the demand with headroom and backlog needs now
    down: int  # replicas that hold the scale-down window's peak (current until a window is proven)
    violated: bool  # its SLO is missed while the cause is still there
    drained: bool  # no backlog left
    rising: bool  # the load moves up by more than a few percent within a start


def stabilize(
    role: Role,
    replicas: RoleReplicas,
    role_state: RoleState,
    config: PolicyConfig,
    now: float,
    need: RoleNeed,
) -> Proposal:
    """Fast up, slow and proven down; pending replicas already count as capacity."""
    current = replicas.current
    since_change = math.inf if role_state.last_change_at is None else now - role_state.last_change_at
    metric = "TTFT" if role == "prefill" else "ITL"
    need_up, need_down = need.up, need.down

    if (
        need.violated
        and replicas.pending == 0
        and need_up <= current
        and since_change >= config.interval_seconds
    ):
        # The capacity model says enough, the SLO says no: trust the SLO, learning catches up.
        need_up = current + 1
        up_reason, up_code = f"{metric} above SLO with no replica loading", ReasonCode.SLO_VIOLATION
    else:
        up_reason = f"load needs {need_up} (have {current}, {replicas.pending} loading)"
        up_code = ReasonCode.LOAD

    if need_up > current:
        if role_state.last_direction == "up" and since_change < config.scale_up_cooldown_seconds:
            return _hold(
                current,
                f"scale-up cooldown ({since_change:.0f}s < {config.scale_up_cooldown_seconds:.0f}s)",
                ReasonCode.COOLDOWN,
            )
        return Proposal(
            replicas=min(need_up, current + config.max_step_up), reason=f"up: {up_reason}", code=up_code
        )

    if need_down < current:
        if need.violated:
            return _hold(current, f"{metric} above SLO", ReasonCode.SLO_VIOLATION)
        if replicas.pending > 0:
            return _hold(current, f"{replicas.pending} replica(s) still loading", ReasonCode.REPLICAS_LOADING)
        # Going to sleep (minReplicas 0, no load in the window) is governed by the idle window, not
        # the reversal budget: a model with traffic a few times an hour sleeps between each.
        sleeping = need_down == 0 and config.limits(role).min_replicas == 0
        if role_state.last_direction == "up" and not sleeping:
            turns = recent_reversals(role_state, config, now)
            if not _room_to_turn_down(turns, config):
                # This scale-down is a reversal, and a scale-up after it would be one more: a load
                # that comes back must not take the role past its budget (no flapping, by count).
                window = config.reversal_window_seconds
                why = f"reversal budget ({turns} in the last {window:.0f}s, budget {config.reversal_budget})"
                return _hold(current, why, ReasonCode.COOLDOWN)
            worth = math.ceil(_REVERSAL_SURPLUS * current)
            if current - need_down < worth:
                # A turn spends the budget for an hour: keep it for a fall worth it, not a dip of
                # a replica or two that a later, larger fall would then find spent.
                why = f"{current - need_down} spare < {worth} worth a reversal"
                return _hold(current, why, ReasonCode.COOLDOWN)
        since_up = math.inf if role_state.last_up_at is None else now - role_state.last_up_at
        cooldown = config.scale_down_cooldown_seconds * role_state.damping
        if since_up < cooldown:
            # Replicas added only to drain a backlog are not needed once it has drained: the
            # cooldown protects the steady need of the last scale-up, not the surplus for the burst.
            steady = role_state.steady_need_at_up
            surplus = current - max(need_down, 0 if steady is None else steady)
            if need.drained and steady is not None and surplus >= max(2, steady * _BURST_SURPLUS):
                target = max(need_down, steady)
                reason = f"down: backlog drained, {target} hold the load (needs {need_down})"
                return Proposal(replicas=target, reason=reason, code=ReasonCode.LOAD)
            return _hold(current, f"{since_up:.0f}s since scale-up < {cooldown:.0f}s", ReasonCode.COOLDOWN)
        if need.rising:
            return _hold(current, "demand rising", ReasonCode.COOLDOWN)
        if since_change < config.scale_down_step_seconds:
            return _hold(
                current,
                f"{since_change:.0f}s since last step < {config.scale_down_step_seconds:.0f}s",
                ReasonCode.COOLDOWN,
            )
        step = max(1, math.floor(current * config.max_step_down_fraction))
        target = max(need_down, current - step)
        window = config.scale_down_window_seconds * role_state.damping
        reason = f"down: {target} hold the {window:.0f}s peak (needs {need_down})"
        return Proposal(replicas=target, reason=reason, code=ReasonCode.LOAD)
    return Proposal(
        replicas=current, reason=f"steady: load needs {need_up}, have {current}", code=ReasonCode.STEADY
    )


def up_locks_in(role_state: RoleState, config: PolicyConfig, now: float) -> bool:
    """Whether replicas added now could not be removed before reversals leave the window: a scale-up
    (itself a reversal after a scale-down) after which a turn down would not fit the budget."""
    turns = recent_reversals(role_state, config, now) + int(role_state.last_direction == "down")
    return not _room_to_turn_down(turns, config)


def _room_to_turn_down(turns: int, config: PolicyConfig) -> bool:
    """After `turns` reversals this hour, whether a turn down and the turn up that may follow fit."""
    return turns + 2 <= config.reversal_budget


def recent_reversals(role_state: RoleState, config: PolicyConfig, now: float) -> int:
    """Reversals of the role within the reversal window before `now`."""
    return sum(1 for at in role_state.reversal_times if now - at < config.reversal_window_seconds)


def _hold(current: int, why: str, code: ReasonCode) -> Proposal:
    return Proposal(replicas=current, reason=f"hold: {why}", code=code)


def decay_damping(role_state: RoleState, config: PolicyConfig, now: float) -> RoleState:
    """Damping halves for every `damping_decay_seconds` without a regretted scale-down."""
    if role_state.damping <= 1.0 or role_state.last_reversal_at is None:
        return role_state
    if now - role_state.last_reversal_at < config.damping_decay_seconds:
        return role_state
    return role_state.model_copy(
        update={"damping": max(role_state.damping / 2, 1.0), "last_reversal_at": now}
    )


def release_settled_damping(
    role_state: RoleState, need_base_down: int, current: int, falling: bool
) -> RoleState:
    """Flap damping ends once the load has settled lower.

    Damping guards against a load that comes back within the longer window: one replica off and
    on again. A load that a base window shows `_SETTLED_SURPLUS` replicas below what runs, and
    that no longer falls, has settled lower instead; holding the damped window's peak then only
    keeps the surplus (on Azure x10, 9 prefill replicas for 12 minutes where 5 held).
    """
    settled_lower = need_base_down <= current - _SETTLED_SURPLUS
    if settled_lower and not falling and role_state.damping > 1.0:
        return role_state.model_copy(update={"damping": 1.0, "last_reversal_at": None})
    return role_state


def advance_role_state(
    old: RoleState,
    direction: Direction,
    capacity: float,
    now: float,
    steady_need: int | None,
    reversal_window_seconds: float,
    sleep_cycle: bool = False,
) -> RoleState:
    """The role's memory after this decision moved it in `direction` (`sleep_cycle`: a move to or
    from zero replicas, which the reversal budget does not count)."""
    if direction == "none":
        return old.model_copy(update={"capacity_tokens_per_second": capacity})
    reversed_ = old.last_direction not in ("none", direction)
    # Going back up after a scale-down means the scale-down was premature: damp the next one.
    regretted = reversed_ and direction == "up" and not sleep_cycle  # a wake from zero is not regret
    return RoleState(
        capacity_tokens_per_second=capacity,
        capacity_basis=old.capacity_basis,
        last_change_at=now,
        last_up_at=now if direction == "up" else old.last_up_at,
        last_direction=direction,
        num_reversals=old.num_reversals + int(reversed_),
        damping=min(old.damping * 2, MAX_DAMPING) if regretted else old.damping,
        last_reversal_at=now if regretted else old.last_reversal_at,
        reversal_times=tuple(
            at
            for at in (*old.reversal_times, *([now] if reversed_ and not sleep_cycle else []))
            if now - at < reversal_window_seconds
        ),
        # Only a scale-up sets what the cooldown protects; a scale-down ends that.
        steady_need_at_up=steady_need if direction == "up" else None,
    )
