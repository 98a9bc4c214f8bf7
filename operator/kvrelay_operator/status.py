"""Pure status computation: child Deployment states -> the parent's status, and a merge patch to it.

Time is passed in (`now`); nothing here reads the clock or talks to the API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

from kvrelay_operator import api, groups
from kvrelay_operator.replicas import target_replicas, waiting_for_model_cache
from kvrelay_operator.resources import cache_key

ConditionStatus = Literal["True", "False", "Unknown"]


class DeploymentState(BaseModel):
    """The parts of a child Deployment that status depends on."""

    spec_replicas: int = Field(default=0, description="spec.replicas")
    replicas: int = Field(default=0, description="status.replicas")
    ready_replicas: int = Field(default=0, description="status.readyReplicas")
    updated_replicas: int = Field(default=0, description="status.updatedReplicas")
    generation: int = Field(default=0, description="metadata.generation")
    observed_generation: int = Field(default=0, description="status.observedGeneration")
    conditions: list[dict[str, Any]] = Field(default_factory=list, description="status.conditions")

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> DeploymentState:
        """Reads a Deployment as the API returns it."""
        spec, status, meta = body.get("spec") or {}, body.get("status") or {}, body.get("metadata") or {}
        return cls(
            spec_replicas=spec.get("replicas") or 0,
            replicas=status.get("replicas") or 0,
            ready_replicas=status.get("readyReplicas") or 0,
            updated_replicas=status.get("updatedReplicas") or 0,
            generation=meta.get("generation") or 0,
            observed_generation=status.get("observedGeneration") or 0,
            conditions=list(status.get("conditions") or []),
        )

    @classmethod
    def from_leader_worker_set(cls, body: dict[str, Any]) -> DeploymentState:
        """Reads a LeaderWorkerSet (replicas count groups, ready when all its pods are). It has no
        status.observedGeneration: updatedReplicas alone tells a rollout in progress."""
        state = cls.from_body(body)
        return state.model_copy(update={"observed_generation": state.generation})

    @classmethod
    def from_workload(cls, body: dict[str, Any]) -> DeploymentState:
        """A worker role's Deployment or LeaderWorkerSet, by its kind."""
        if body.get("kind") == groups.KIND:
            return cls.from_leader_worker_set(body)
        return cls.from_body(body)


def set_condition(
    conditions: list[api.Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[api.Condition]:
    """Conditions with one replaced; lastTransitionTime only moves when the status flips."""
    previous = next((c for c in conditions if c.type == type_), None)
    since = previous.last_transition_time if previous is not None and previous.status == status else now
    new = api.Condition(
        type=type_, status=status, reason=reason, message=message,
        last_transition_time=since, observed_generation=generation,
    )  # fmt: skip
    return [c for c in conditions if c.type != type_] + [new]


# A container waiting for one of these will not start by itself: a missing Secret or ConfigMap, an image
# that cannot be pulled, a crash loop. The kubelet's message says which.
STUCK_REASONS = frozenset({
    "CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff",
    "InvalidImageName", "CrashLoopBackOff", "RunContainerError",
})  # fmt: skip


class PodScheduling(BaseModel):
    """Whether one worker or router pod is placed (the scheduler's words when not), and whether a
    container of it is stuck (the kubelet's words)."""

    role: str = Field(description="The pod's kvrelay.dev/role label.")
    pod: str = Field(description="Pod name.")
    unschedulable: str | None = Field(
        default=None, description="PodScheduled=False/Unschedulable message, else None."
    )
    container_error: str | None = Field(
        default=None, description="The first container waiting for a STUCK_REASONS reason, with its message."
    )
    group: str | None = Field(default=None, description="Its LeaderWorkerSet group, <lws>-<index>, if any.")
    scheduled: bool = Field(default=False, description="Bound to a node.")
    ready: bool = Field(default=False, description="Condition Ready is True (counted for groups only).")

    @classmethod
    def from_body(cls, body: dict[str, Any], role: str) -> PodScheduling:
        """Reads a Pod as the API returns it (only a terminal scheduling failure counts)."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        message = None
        for cond in status.get("conditions") or []:
            not_placed = cond.get("type") == "PodScheduled" and cond.get("status") == "False"
            if not_placed and cond.get("reason") == "Unschedulable":
                message = cond.get("message") or "Unschedulable"
        stuck = None
        for container in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if stuck is None and waiting.get("reason") in STUCK_REASONS:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                stuck = f"container {container.get('name')}: {waiting['reason']}{detail}"
        member = groups.GroupPod.from_body(body, role)
        return cls(role=role, pod=meta.get("name") or "", unschedulable=message, container_error=stuck,
                   group=member.group if member else None, scheduled=member.scheduled if member else False,
                   ready=member.ready if member else False)  # fmt: skip


def _group_sizes(spec: api.DisaggregatedModelSpec) -> dict[str, int]:
    return {r: groups.pods_per_replica(getattr(spec, r)) for r in api.WORKER_ROLES
            if groups.spans_nodes(getattr(spec, r))}  # fmt: skip


def _members(pods: list[PodScheduling]) -> list[groups.GroupPod]:
    return [groups.GroupPod(role=p.role, group=p.group, scheduled=p.scheduled, ready=p.ready)
            for p in pods if p.group]  # fmt: skip


def incomplete_groups_by_role(spec: api.DisaggregatedModelSpec, pods: list[PodScheduling]) -> dict[str, str]:
    """role -> which of its LeaderWorkerSet groups are only partly scheduled, and what would help."""
    return groups.incomplete_groups(_members(pods), _group_sizes(spec))


def ready_groups_by_role(spec: api.DisaggregatedModelSpec, pods: list[PodScheduling]) -> dict[str, int]:
    """role -> its LeaderWorkerSet groups whose pods are all Ready (groups.ready_groups)."""
    return groups.ready_groups(_members(pods), _group_sizes(spec))


def _by_role(pods: list[PodScheduling], problem: Callable[[PodScheduling], str | None]) -> dict[str, str]:
    """role -> "N pod(s) <problem of the first, by name>", over the pods that have a problem."""
    stuck: dict[str, list[PodScheduling]] = {}
    for pod in pods:
        if problem(pod) is not None:
            stuck.setdefault(pod.role, []).append(pod)
    out = {}
    for role, group in sorted(stuck.items()):
        first = min(group, key=lambda p: p.pod)
        noun = "pod" if len(group) == 1 else "pods"
        out[role] = f"{len(group)} {noun} {problem(first)}"
    return out


def unschedulable_by_role(pods: list[PodScheduling]) -> dict[str, str]:
    """role -> "N pod(s) unschedulable: <the scheduler's message for the first, by name>"."""
    return _by_role(pods, lambda p: None if p.unschedulable is None else f"unschedulable: {p.unschedulable}")


def container_errors_by_role(pods: list[PodScheduling]) -> dict[str, str]:
    """role -> "N pod(s) failing: <pod>: <the kubelet's words for the first, by name>"."""
    return _by_role(
        pods, lambda p: None if p.container_error is None else f"failing: {p.pod}: {p.container_error}"
    )


def unschedulable_message(unschedulable: dict[str, str]) -> str:
    """The PodsScheduled condition's message for unschedulable_by_role's result ('' when all placed)."""
    return "; ".join(f"{role}: {why}" for role, why in unschedulable.items())


def _failing(state: DeploymentState) -> str | None:
    """Why a Deployment is failing, from its own conditions, or None."""
    for cond in state.conditions:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return cond.get("message") or "ReplicaFailure"
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return cond.get("message") or "ProgressDeadlineExceeded"
    return None


def compute_status(
    spec: api.DisaggregatedModelSpec,
    status: api.DisaggregatedModelStatus,
    deployments: dict[str, DeploymentState],
    generation: int,
    router_endpoint: str,
    now: str,
    observed_generation: int | None = None,
    unschedulable: dict[str, str] | None = None,
    container_errors: dict[str, str] | None = None,
    incomplete_groups: dict[str, str] | None = None,
    leader_worker_set_available: bool = True,
    ready_groups: dict[str, int] | None = None,
) -> api.DisaggregatedModelStatus:
    """The status the operator wants, from the spec, current status and child Deployment states.

    `observed_generation` is set by the reconcile path only; the mirror path keeps the current one.
    `unschedulable` (role -> why, from unschedulable_by_role) explains replicas the scheduler cannot place;
    `container_errors` (container_errors_by_role) pods whose containers cannot start: both Degraded.
    `incomplete_groups` (incomplete_groups_by_role): groups of a role spanning nodes that are partly
    placed (Ready False, IncompleteGroup); without `leader_worker_set_available` such a role cannot run
    at all (Ready False, LeaderWorkerSetMissing). `ready_groups` (ready_groups_by_role) caps such a
    role's ready replicas: the LeaderWorkerSet's own count takes a group with a Pending pod for ready.
    """
    unschedulable = unschedulable or {}
    incomplete = incomplete_groups or {}
    missing_lws: list[str] = []
    new = status.model_copy(deep=True)
    new.model_cache = cache_status_for_spec(spec, status.model_cache)
    if observed_generation is not None:
        new.observed_generation = observed_generation
    new.router_endpoint = router_endpoint
    waiting, rolling, failing = [], [], []
    for role in api.ROLES:
        target = target_replicas(spec, status, role)
        state = deployments.get(role)
        if state is not None and ready_groups is not None and role in ready_groups:
            state = state.model_copy(update={"ready_replicas": min(state.ready_replicas, ready_groups[role])})
        current: api.RoleStatus | None = getattr(status, role)
        role_status = api.RoleStatus(
            replicas=state.replicas if state else 0,
            ready_replicas=state.ready_replicas if state else 0,
            desired_replicas=target,
        )
        if spec.autoscaling.mode == "auto" and role != "router":
            # In mode auto only the autoscaler writes desiredReplicas (unset until its first
            # decision): a value derived here from a possibly stale parent could clobber a newer one.
            role_status.desired_replicas = current.desired_replicas if current is not None else None
        setattr(new, role, role_status)
        spans = role != "router" and groups.spans_nodes(getattr(spec, role))
        if state is None:
            if spans and not leader_worker_set_available:
                missing_lws.append(f"{role} {groups.MISSING_MESSAGE}")
            else:
                waiting.append(f"{role} {groups.KIND if spans else 'Deployment'} missing")
            continue
        if state.ready_replicas < target:
            reasons = [incomplete[role]] if role in incomplete else []
            reasons += [unschedulable[role]] if role in unschedulable else []
            why = f" ({'; '.join(reasons)})" if reasons else ""
            waiting.append(f"{role} {state.ready_replicas}/{target} ready{why}")
        if state.observed_generation < state.generation or state.updated_replicas < target:
            rolling.append(role)
        reason = _failing(state)
        if reason is not None:
            failing.append(f"{role}: {reason}")

    failing += [f"{role}: {why}" for role, why in (container_errors or {}).items()]
    conds = list(status.conditions)
    gen = generation  # the spec generation these conditions describe (same value on both paths)
    asleep = scaled_to_zero(spec, status)
    if missing_lws:
        message = "; ".join(missing_lws + waiting)
        conds = set_condition(conds, "Ready", "False", "LeaderWorkerSetMissing", message, now, gen)
    elif waiting and incomplete:
        conds = set_condition(conds, "Ready", "False", "IncompleteGroup", "; ".join(waiting), now, gen)
    elif waiting:
        conds = set_condition(conds, "Ready", "False", "WaitingForReplicas", "; ".join(waiting), now, gen)
    elif asleep:
        # Serving: a request is held at the router while the role starts again (or answered 503 at
        # once when holding is off), so Ready stays True and the message says why a pool is empty.
        message = scaled_to_zero_message(spec, asleep)
        conds = set_condition(conds, "Ready", "True", "ScaledToZero", message, now, gen)
    else:
        conds = set_condition(conds, "Ready", "True", "AllReplicasReady", "all roles ready", now, gen)
    if missing_lws:
        message = "; ".join(missing_lws)
        conds = set_condition(conds, "Progressing", "False", "LeaderWorkerSetMissing", message, now, gen)
    elif incomplete:
        message = "; ".join(f"{role}: {why}" for role, why in incomplete.items())
        conds = set_condition(conds, "Progressing", "True", "IncompleteGroup", message, now, gen)
    elif rolling or waiting:
        message = f"rolling out {', '.join(rolling)}" if rolling else "; ".join(waiting)
        conds = set_condition(conds, "Progressing", "True", "RollingOut", message, now, gen)
    else:
        conds = set_condition(conds, "Progressing", "False", "Settled", "children match the spec", now, gen)
    if failing:
        conds = set_condition(conds, "Degraded", "True", "ChildFailing", "; ".join(failing), now, gen)
    else:
        conds = set_condition(conds, "Degraded", "False", "AsExpected", "", now, gen)
    if unschedulable:
        message = unschedulable_message(unschedulable)
        conds = set_condition(conds, "PodsScheduled", "False", "Unschedulable", message, now, gen)
    else:
        conds = set_condition(conds, "PodsScheduled", "True", "AllScheduled", "", now, gen)
    conds = _scaling_limited(spec, status, conds, now, gen)
    conds = _model_cache_condition(new.model_cache, conds, now, gen)
    new.conditions = sorted(conds, key=lambda c: c.type)
    new.phase = (
        "Degraded"
        if failing
        else "Ready"
        if not (waiting or missing_lws)
        else "Progressing"
        if deployments
        else "Pending"
    )
    return new


def scaled_to_zero(spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus) -> list[str]:
    """Worker roles the operator runs at zero replicas (the autoscaler's scale to zero, or the spec's
    replicas 0); not while the pools wait for a first model cache fill (that has its own condition)."""
    if waiting_for_model_cache(spec, status):
        return []
    return [role for role in api.WORKER_ROLES if target_replicas(spec, status, role) == 0]


def scaled_to_zero_message(spec: api.DisaggregatedModelSpec, roles: list[str]) -> str:
    """The Ready condition's message while `roles` are at zero: what a client sees meanwhile."""
    names = " and ".join(roles)
    wait = spec.router.max_wait_seconds
    if wait > 0:
        seen = f"requests wait at the router (up to {wait} s) until a replica is ready"
        if spec.autoscaling.mode == "auto":
            seen += "; the autoscaler scales up on held requests"
    else:
        seen = "requests get a 503 at once (router.maxWaitSeconds is 0)"
    return f"all roles ready; {names} scaled to zero: {seen}"


def cache_status_for_spec(
    spec: api.DisaggregatedModelSpec, current: api.ModelCacheStatus | None
) -> api.ModelCacheStatus | None:
    """The model cache's state once the spec is read: a new source or revision starts Filling its own
    key, keeping the last completed one (the pods serve it meanwhile); no cache, no state."""
    if spec.model.cache is None:
        return None
    key = cache_key(spec.model)
    if current is not None and current.key == key:
        return current
    return api.ModelCacheStatus(key=key, phase="Filling", ready_key=current.ready_key if current else None)


def cache_status_from_job(current: api.ModelCacheStatus, job: dict[str, Any]) -> api.ModelCacheStatus:
    """The cache state after an event of the fill Job of ``current.key``: Complete -> Ready (pods now
    serve this key), Failed -> Failed with the Job's own message, else Filling."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []}
    if (conditions.get("Complete") or {}).get("status") == "True":
        return current.model_copy(update={"phase": "Ready", "ready_key": current.key, "message": None})
    failed = conditions.get("Failed") or {}
    if failed.get("status") == "True":
        message = f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip(": ")
        return current.model_copy(update={"phase": "Failed", "message": message[:1000]})
    return current.model_copy(update={"phase": "Filling", "message": None})


def with_model_cache(
    status: api.DisaggregatedModelStatus, cache: api.ModelCacheStatus, now: str, gen: int | None
) -> api.DisaggregatedModelStatus:
    """``status`` with the model cache state and its ModelCacheReady condition (a fill Job's event)."""
    conditions = sorted(
        _model_cache_condition(cache, list(status.conditions), now, gen), key=lambda c: c.type
    )
    return status.model_copy(update={"model_cache": cache, "conditions": conditions})


def _model_cache_condition(
    cache: api.ModelCacheStatus | None, conds: list[api.Condition], now: str, gen: int | None
) -> list[api.Condition]:
    """ModelCacheReady: True once the spec's checkpoint is in the cache; why not, otherwise."""
    if cache is None:
        return [c for c in conds if c.type != "ModelCacheReady"]
    serving = f"; pods serve {cache.ready_key} meanwhile" if cache.ready_key not in (None, cache.key) else ""
    if cache.phase == "Ready":
        return set_condition(
            conds, "ModelCacheReady", "True", "Filled", f"checkpoint {cache.key} cached", now, gen
        )
    if cache.phase == "Failed":
        fallback = serving or "; pods download the checkpoint themselves"
        message = f"filling {cache.key} failed: {cache.message or 'the Job failed'}{fallback}"
        return set_condition(conds, "ModelCacheReady", "False", "FillFailed", message, now, gen)
    waiting = serving or "; the pools start when it completes"
    return set_condition(
        conds, "ModelCacheReady", "False", "Filling", f"filling {cache.key}{waiting}", now, gen
    )


# Conditions whose turn to a bad state is announced by a Warning Event, and their good state.
_WATCHED = {"Degraded": "False", "PodsScheduled": "True", "ModelCacheReady": "True"}
# Not-good states that are progress, not trouble: no Warning for them.
_EXPECTED_REASONS = {"Filling"}


def condition_events(
    before: api.DisaggregatedModelStatus, after: api.DisaggregatedModelStatus
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events a status write should post: a Warning when a watched
    condition turns bad or its message changes (another failure), a Normal one when it recovers."""
    old = {c.type: c for c in before.conditions}
    events = []
    for cond in after.conditions:
        good = _WATCHED.get(cond.type)
        if good is None:
            continue
        prev = old.get(cond.type)
        changed = prev is None or (prev.status, prev.message) != (cond.status, cond.message)
        if cond.status != good and changed and cond.reason not in _EXPECTED_REASONS:
            events.append(("Warning", cond.reason, cond.message))
        elif cond.status == good and prev is not None and prev.status != good:
            events.append(("Normal", cond.reason, f"{cond.type}: {cond.reason} (was {prev.reason})"))
    return events


def _scaling_limited(
    spec: api.DisaggregatedModelSpec,
    status: api.DisaggregatedModelStatus,
    conds: list[api.Condition],
    now: str,
    gen: int | None,
) -> list[api.Condition]:
    """ScalingLimited=True when the autoscaler asked for replicas outside a role's min/max."""
    if spec.autoscaling.mode != "auto":
        return [c for c in conds if c.type != "ScalingLimited"]
    clamped = []
    for role in api.WORKER_ROLES:
        role_status: api.RoleStatus | None = getattr(status, role)
        wanted = role_status.desired_replicas if role_status else None
        if wanted is not None and wanted != target_replicas(spec, status, role):
            clamped.append(f"{role} wants {wanted}, clamped to {target_replicas(spec, status, role)}")
    if clamped:
        return set_condition(conds, "ScalingLimited", "True", "ClampedToBounds", "; ".join(clamped), now, gen)
    return set_condition(conds, "ScalingLimited", "False", "WithinBounds", "", now, gen)


def status_merge_patch(
    old: api.DisaggregatedModelStatus, new: api.DisaggregatedModelStatus
) -> dict[str, Any]:
    """A JSON merge patch for `status` holding only what changed between two computed statuses.

    Object fields send only their changed keys (merge patch merges objects), so an unchanged
    desiredReplicas is never re-sent and cannot clobber a newer value the autoscaler wrote.
    """
    before = old.model_dump(by_alias=True, exclude_none=True, mode="json")
    after = new.model_dump(by_alias=True, exclude_none=True, mode="json")
    patch: dict[str, Any] = {}
    old_cache, new_cache = before.pop("modelCache", None), after.pop("modelCache", None)
    if old_cache != new_cache:
        # explicit nulls for what went away (a merge patch keeps keys it does not name): no stale message
        removed = {k: None for k in old_cache or {} if k not in (new_cache or {})}
        patch["modelCache"] = None if new_cache is None else {**removed, **new_cache}
    for key, value in after.items():
        previous = before.get(key)
        if previous == value:
            continue
        if isinstance(value, dict) and isinstance(previous, dict) and key != "autoscaler":
            value = {k: v for k, v in value.items() if previous.get(k) != v}
        patch[key] = value
    return patch
