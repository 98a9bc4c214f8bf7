"""The bounds phase: what stabilise proposed, within per-role limits, the P:D ratio and the GPU budget.

Pure, like the policy. Each bound that moves a role appends its note to the role's reason and sets
its `ReasonCode`; they apply in this order, so the last bound that moved a role names it:

    proposed -> [min, max] per role -> ratio_max, ratio_min -> GPU budget split by need
"""

from __future__ import annotations

import math

from kvrelay_operator.autoscaler.types import ROLES, PolicyConfig, Proposal, ReasonCode, Role


def apply_bounds(
    proposed: dict[Role, Proposal], need: dict[Role, int], config: PolicyConfig
) -> tuple[dict[Role, Proposal], bool]:
    """Bounded proposals, and whether a bound cut what was proposed (`Decision.limited`)."""
    clamped, clamp_cut = clamp_to_limits(proposed, config)
    ratioed, ratio_cut = apply_ratio_bounds(clamped, config)
    budgeted, budget_cut = fit_gpu_budget(ratioed, proposed, need, config)
    return budgeted, clamp_cut or ratio_cut or budget_cut


def within_limits(role: Role, replicas: int, config: PolicyConfig) -> int:
    """`replicas` clamped to the role's [min_replicas, max_replicas]."""
    limits = config.limits(role)
    return min(max(replicas, limits.min_replicas), limits.max_replicas)


def clamp_to_limits(
    proposed: dict[Role, Proposal], config: PolicyConfig
) -> tuple[dict[Role, Proposal], bool]:
    """Each role within its min/max; True when a max cut a role."""
    out = dict(proposed)
    cut = False
    for role in ROLES:
        replicas = out[role].replicas
        clamped = within_limits(role, replicas, config)
        if clamped != replicas:
            limits = config.limits(role)
            note = f"clamped to [{limits.min_replicas}, {limits.max_replicas}]"
            out[role] = out[role].moved(clamped, note, ReasonCode.REPLICA_BOUNDS)
            cut = cut or clamped < replicas
    return out, cut


def apply_ratio_bounds(
    proposed: dict[Role, Proposal], config: PolicyConfig
) -> tuple[dict[Role, Proposal], bool]:
    """The prefill:decode ratio within [ratio_min, ratio_max]; True when it cut a role.

    The short side is raised first (up to its max): a ratio bound must never cost SLO headroom;
    the long side comes down only as far as the raised side cannot follow. A role at zero has no
    ratio to keep: only an idle model's roles get there (scale_to_zero.py), and load brings both up.
    """
    out = dict(proposed)
    p, d = out["prefill"].replicas, out["decode"].replicas
    p_max, d_max = config.prefill.max_replicas, config.decode.max_replicas
    cut = False
    if config.ratio_max is not None and d > 0 and p / d > config.ratio_max:
        new_d = min(math.ceil(p / config.ratio_max - 1e-9), d_max)
        new_p = min(p, math.floor(new_d * config.ratio_max + 1e-9))
        out = _moved_by_ratio(out, {"prefill": new_p, "decode": new_d}, f"ratio max {config.ratio_max}")
        cut = cut or new_p < p
        p, d = new_p, new_d
    if config.ratio_min is not None and p > 0 and d > 0 and p / d < config.ratio_min:
        new_p = min(math.ceil(d * config.ratio_min - 1e-9), p_max)
        new_d = min(d, math.floor(new_p / config.ratio_min + 1e-9))
        out = _moved_by_ratio(out, {"prefill": new_p, "decode": new_d}, f"ratio min {config.ratio_min}")
        cut = cut or new_d < d
    return out, cut


def _moved_by_ratio(
    proposed: dict[Role, Proposal], replicas: dict[Role, int], note: str
) -> dict[Role, Proposal]:
    """Each role the ratio moved to its new count, with `note`."""
    return {
        role: proposed[role]
        if replicas[role] == proposed[role].replicas
        else proposed[role].moved(replicas[role], note, ReasonCode.RATIO_BOUND)
        for role in ROLES
    }


def fit_gpu_budget(
    bounded: dict[Role, Proposal], proposed: dict[Role, Proposal], need: dict[Role, int], config: PolicyConfig
) -> tuple[dict[Role, Proposal], bool]:
    """Within the GPU budget, split by need; True when the budget bound.

    A role is noted as cut by the budget wherever it ends away from what stabilise `proposed`.
    """
    replicas = {role: bounded[role].replicas for role in ROLES}
    if config.gpu_budget is None or gpus_used(replicas, config) <= config.gpu_budget:
        return bounded, False
    split = split_gpu_budget(replicas, need, config)
    out = dict(bounded)
    for role in ROLES:
        if split[role] != proposed[role].replicas:
            out[role] = out[role].moved(split[role], f"GPU budget {config.gpu_budget}", ReasonCode.GPU_BUDGET)
        else:
            out[role] = out[role].model_copy(update={"replicas": split[role]})
    return out, True


def split_gpu_budget(
    desired: dict[Role, int], need: dict[Role, int], config: PolicyConfig
) -> dict[Role, int]:
    """Fill the budget from the minimums up, each GPU to the role whose need is least met."""
    alloc: dict[Role, int] = {role: config.limits(role).min_replicas for role in ROLES}
    while True:
        candidates = [
            role
            for role in ROLES
            if alloc[role] < desired[role]
            and gpus_used(alloc, config) + config.limits(role).gpus_per_replica <= (config.gpu_budget or 0)
        ]
        if not candidates:
            return alloc
        role = min(candidates, key=lambda r: (alloc[r] / max(need[r], desired[r], 1), r))
        alloc[role] += 1


def gpus_used(replicas: dict[Role, int], config: PolicyConfig) -> int:
    """GPUs that `replicas` take together."""
    return sum(replicas[role] * config.limits(role).gpus_per_replica for role in ROLES)
