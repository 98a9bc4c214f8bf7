"""Which pods a shrinking worker pool loses first: pod loads -> `controller.kubernetes.io/pod-deletion-cost`.

Pure: pods and their loads in, one integer per pod out. The ReplicaSet controller removes pods with
the lowest cost first (after pods that are unscheduled, pending or not Ready, which it always takes
first), so the cost is the pod's place in the order in which it should go:

    cost 0 ........................................................ cost n-1
    not Ready | Ready, load unknown | idle ... busy (requests held, then KV in use)

A StatefulSet pool would ignore this annotation and remove the highest ordinal whatever its load;
worker drain and request migration are what protect those requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


class PodLoad(BaseModel):
    """What one worker holds now, from its own /metrics."""

    model_config = ConfigDict(frozen=True)

    running: int = Field(default=0, ge=0, description="kvrelay_requests_running: sequences in the batch.")
    waiting: int = Field(default=0, ge=0, description="kvrelay_requests_waiting: queued or awaiting KV.")
    kv_cache_usage: float = Field(default=0.0, ge=0.0, description="kvrelay_kv_cache_usage_ratio, 0..1.")

    @property
    def requests(self) -> int:
        """Requests that would have to drain or migrate if the pod went."""
        return self.running + self.waiting


class WorkerPod(BaseModel):
    """The parts of a worker pod the choice depends on."""

    model_config = ConfigDict(frozen=True)

    name: str
    ip: str | None = Field(default=None, description="status.podIP; None before the pod has one.")
    ready: bool = Field(default=False, description="Condition Ready is True.")
    terminating: bool = Field(default=False, description="metadata.deletionTimestamp is set.")
    created: str = Field(default="", description="metadata.creationTimestamp (RFC 3339 sorts as text).")
    deletion_cost: str | None = Field(default=None, description="The annotation as it is now.")

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> WorkerPod:
        """Reads a Pod as the API returns it."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        return cls(
            name=meta["name"], ip=status.get("podIP") or None, ready=ready,
            terminating=bool(meta.get("deletionTimestamp")), created=meta.get("creationTimestamp") or "",
            deletion_cost=(meta.get("annotations") or {}).get(DELETION_COST),
        )  # fmt: skip


class VictimPlan(BaseModel):
    """Deletion costs for a pool, the pods expected to go, and the annotations that must change."""

    costs: dict[str, int] = Field(description="Pod name -> deletion cost (distinct, 0 = goes first).")
    victims: list[str] = Field(description="The pods the ReplicaSet controller should remove, in order.")
    changed: dict[str, int] = Field(description="The subset of costs whose annotation differs now.")


def _order_key(pod: WorkerPod, load: PodLoad | None) -> tuple[bool, bool, int, float]:
    # Not Ready first (the ReplicaSet controller takes those first anyway), then Ready pods whose
    # load could not be read (they may be gone already), then by requests held, then by KV in use.
    if load is None:
        return (False, pod.ready, 0, 0.0)
    return (True, True, load.requests, load.kv_cache_usage)


def plan_deletion_costs(
    pods: Sequence[WorkerPod], loads: Mapping[str, PodLoad], num_removed: int
) -> VictimPlan:
    """Costs ordering `pods` from first-to-go to last; a pod missing from `loads` counts as unreachable.

    Terminating pods are left out (the controller no longer counts them). Ties go to the newer pod
    first (a colder prefix cache, and the controller's own preference), then by name.
    """
    live = sorted((p for p in pods if not p.terminating), key=lambda p: p.name)
    live.sort(key=lambda p: p.created, reverse=True)  # stable: newer first among equal loads
    live.sort(key=lambda p: _order_key(p, loads.get(p.name) if p.ready else None))
    costs = {pod.name: rank for rank, pod in enumerate(live)}
    changed = {p.name: costs[p.name] for p in live if p.deletion_cost != str(costs[p.name])}
    victims = [p.name for p in live[: max(0, num_removed)]]
    return VictimPlan(costs=costs, victims=victims, changed=changed)
