"""Replica rules: how many replicas each role runs, from the spec and the autoscaler's status.

The one place these rules live: the renderer puts the result in each Deployment, status reports
it as desiredReplicas and the handlers compare live Deployments against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvrelay_operator import api


def target_replicas(
    spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus, role: api.Role
) -> int:
    """Replicas the reconciler applies: in mode auto the autoscaler's status.<role>.desiredReplicas
    (clamped to min/max) when set, else spec.<role>.replicas; 0 for every role while a model cache
    is filled for the first time (nothing to load yet)."""
    if waiting_for_model_cache(spec, status):
        return 0
    if role == "router":
        return spec.router.replicas
    role_spec: api.WorkerRoleSpec = getattr(spec, role)
    role_status: api.RoleStatus | None = getattr(status, role)
    if (
        spec.autoscaling.mode == "auto"
        and role_status is not None
        and role_status.desired_replicas is not None
    ):
        return max(role_spec.min_replicas, min(role_spec.max_replicas, role_status.desired_replicas))
    return role_spec.replicas


def waiting_for_model_cache(spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus) -> bool:
    """spec.model.cache set, no fill ever completed and none failed (a failure falls back to per-pod
    downloads): the pools wait at 0 replicas."""
    if spec.model.cache is None:
        return False
    cache = status.model_cache
    return cache is None or (cache.ready_key is None and cache.phase != "Failed")


def replicas_set_by_others(deployment: Mapping[str, Any], field_manager: str) -> bool:
    """Whether someone other than ``field_manager`` last set the Deployment's spec.replicas (``kubectl
    scale``, an HPA, an edit), from its managedFields.

    A Deployment whose replicas differ from the target but were set by the operator itself is not drift:
    the operator has a change of its own to make (a scale-down marks its victims first) and makes it.
    """
    for entry in (deployment.get("metadata") or {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if entry.get("manager") != field_manager and "f:replicas" in fields:
            return True
    return False
