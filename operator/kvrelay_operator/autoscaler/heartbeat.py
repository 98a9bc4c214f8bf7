"""When a decision is written to status: on a material change, else as a heartbeat.

Pure. Every decision updates the metrics and the decision log; status (one API write, one watch
event for every watcher of the model) only when what it says would change: replicas, a reason
code, hold, the mode, the limits, a move of the learned state that a restart should not lose,
or, in mode auto, status not showing the replicas decided.
Otherwise at most every `HEARTBEAT_SECONDS`, so `lastDecisionTime` shows the autoscaler is alive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from kvrelay_operator.autoscaler.types import ROLES, Decision, PolicyState, Role

HEARTBEAT_SECONDS = 300.0
# A learned value (capacity, mean output tokens) moving by more than this share since the last
# write is worth writing: a restart then continues within this of what the running operator knew.
LEARNED_CHANGE = 0.05


@dataclasses.dataclass(frozen=True)
class Written:
    """What one status write said, to compare the next decision with."""

    at: float
    outcome: tuple[object, ...]  # mode, hold, limited; per role replicas, code, direction, damping, reversals
    learned: tuple[float | None, ...]  # per role capacity, then mean output tokens
    # False when status does not show the replicas decided in mode auto (a lost write, a value
    # another writer put there): that is written at once, whatever was written before.
    applied: bool = True


def summarize(
    decision: Decision,
    state: PolicyState,
    mode: str,
    status_desired: Mapping[Role, int | None] | None = None,
) -> Written:
    """The parts of a decision and its next state that should_write compares; `status_desired`:
    status.<role>.desiredReplicas as the decision found it."""
    shown = status_desired is None or all(status_desired[r] == decision.role(r).replicas for r in ROLES)
    applied = mode != "auto" or decision.hold or shown
    outcome: list[object] = [mode, decision.hold, decision.limited]
    for role in ROLES:
        moved, remembered = decision.role(role), state.role(role)
        outcome += [moved.replicas, moved.code.value, remembered.last_direction]
        outcome += [remembered.damping, remembered.num_reversals, remembered.capacity_basis]
    learned = tuple(state.role(role).capacity_tokens_per_second for role in ROLES)
    return Written(
        at=decision.at, outcome=tuple(outcome), learned=(*learned, state.mean_output_tokens), applied=applied
    )


def should_write(
    last: Written | None,
    current: Written,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
    learned_change: float = LEARNED_CHANGE,
) -> bool:
    """Whether `current` goes to status, given what was `last` written (None: nothing yet by us)."""
    if last is None or not current.applied or current.outcome != last.outcome:
        return True
    if current.at - last.at >= heartbeat_seconds:
        return True
    pairs = zip(last.learned, current.learned, strict=True)
    return any(_moved(old, new, learned_change) for old, new in pairs)


def _moved(old: float | None, new: float | None, share: float) -> bool:
    if old is None or new is None:
        return old is not new
    return abs(new - old) > share * abs(old)
