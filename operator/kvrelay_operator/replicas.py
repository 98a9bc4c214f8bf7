"""Replica rules: how many replicas each role runs, from the spec and the autoscaler's status.

The one place these rules live: the renderer puts the result in each Deployment, status reports
it as desiredReplicas and the handlers compare live Deployments against it.
"""

from __future__ import annotations

from kvrelay_operator import api


def target_replicas(
    spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus, role: api.Role
) -> int:
    """Replicas the reconciler applies: in mode auto the autoscaler's status.<role>.desiredReplicas
    (clamped to min/max) when set, else spec.<role>.replicas."""
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
