"""Replicas that span nodes: a worker role whose tensorParallel exceeds gpusPerNode runs as a
LeaderWorkerSet (sigs.k8s.io/lws, v0.7+) of groups of tensorParallel / gpusPerNode pods.

Pure: sizes, names, the worker's TP flags, the LeaderWorkerSet manifest built from the pod template
a Deployment would have, and the honest word on groups that are only partly placed.

How LWS v0.7.0 names things (api/leaderworkerset/v1/leaderworkerset_types.go, pkg/controllers,
pkg/utils/pod/pod_utils.go, pkg/webhooks/pod_webhook.go):

    LeaderWorkerSet <lws>  ->  leader StatefulSet <lws>        pods <lws>-<group>
                               worker StatefulSet <lws>-<group> pods <lws>-<group>-<index>, index 1..size-1
                               headless Service <lws> (publishNotReadyAddresses, all pods of the set)
    leader address (env LWS_LEADER_ADDRESS): <lws>-<group>.<lws>.<namespace>

The controller puts worker-index "0" on the leader template itself; the pod webhook adds group-index
(and worker-index on workers) and the LWS_* env. Our own headless Service (router discovery) is named
<model>-<role>, so the set is named <model>-<role>-lws: were it <model>-<role>, the controller would
find our Service there and create none, and ours, which publishes ready pods only, would leave a
loading leader without a DNS name its ranks could dial.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from kvrelay_operator import api

GROUP = "leaderworkerset.x-k8s.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LeaderWorkerSet"
PLURAL = "leaderworkersets"
CRD_NAME = f"{PLURAL}.{GROUP}"
SET_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
NAME_SUFFIX = "-lws"
TP_PORT = 29500  # torch.distributed's customary rendezvous port, on the leader
LWS_NAME_ENV = "KVRELAY_LWS_NAME"
# The shared key of a group's rank links (worker_image/kvrelay_worker/tp/group.py AUTHKEY_ENV): within
# one pod the worker makes one up, across pods every rank must hold the same, from the model's Secret.
TP_SECRET_ENV = "KVRELAY_TP_SECRET"
TP_SECRET_KEY = "secret"
TP_SECRET_SUFFIX = "-tp-link"
MISSING_MESSAGE = (
    "needs a LeaderWorkerSet (tensorParallel above gpusPerNode) but the cluster does not serve "
    f"{API_VERSION}: install LeaderWorkerSet v0.7 or newer (sigs.k8s.io/lws), or lower tensorParallel "
    "to gpusPerNode"
)
GANG_ADVICE = (
    "kube-scheduler does not gang-schedule: add a gang scheduler (Kueue, Volcano or the coscheduling "
    "plugin) or free a node"
)


def spans_nodes(role: api.WorkerRoleSpec) -> bool:
    """Whether one replica of the role needs more GPUs than a node has (a LeaderWorkerSet)."""
    return role.tensor_parallel > role.gpus_per_node


def pods_per_replica(role: api.WorkerRoleSpec) -> int:
    """Pods of one replica: 1, or tensorParallel / gpusPerNode (the group size)."""
    return role.tensor_parallel // role.gpus_per_node if spans_nodes(role) else 1


def gpus_per_pod(role: api.WorkerRoleSpec) -> int:
    """GPUs each pod requests: the whole degree, or a node's worth per pod of a group."""
    return role.gpus_per_node if spans_nodes(role) else role.tensor_parallel


def set_name(workload_name: str) -> str:
    """The LeaderWorkerSet's name (and its headless Service's, and its pods' prefix)."""
    return f"{workload_name}{NAME_SUFFIX}"


def tp_secret_name(model_name: str, uid: str) -> str:
    """The model's TP link Secret: <model>-tp-link-<first 8 of its uid>.

    The uid part keeps a model re-created under the same name from taking over its predecessor's
    Secret, which the garbage collector deletes a moment later (the create of the new one would
    have found it, 409, and kept it). At most 55 + 9 + 8 characters, well within 253."""
    return f"{model_name}{TP_SECRET_SUFFIX}-{uid[:8]}"


def tp_secret_env(model_name: str, uid: str) -> dict[str, Any]:
    """The env entry that hands every pod of a group the model's shared TP link key."""
    ref = {"name": tp_secret_name(model_name, uid), "key": TP_SECRET_KEY}
    return {"name": TP_SECRET_ENV, "valueFrom": {"secretKeyRef": ref}}


def tp_args(role: api.WorkerRoleSpec) -> list[str]:
    """The worker's tensor-parallel flags; ranks on other pods are found through the LWS (`auto`:
    LWS_WORKER_INDEX / LWS_LEADER_ADDRESS, else from POD_NAME and KVRELAY_LWS_NAME)."""
    if role.tensor_parallel == 1:
        return []
    args = ["--tensor-parallel", str(role.tensor_parallel)]
    if spans_nodes(role):
        args += ["--tp-nodes", str(pods_per_replica(role)), "--tp-node-rank", "auto",
                 "--tp-leader-addr", "auto", "--tp-port", str(TP_PORT)]  # fmt: skip
    return args


def leader_worker_set(deployment: dict[str, Any], role: api.WorkerRoleSpec) -> dict[str, Any]:
    """The LeaderWorkerSet for a worker role, from the Deployment it would otherwise be: one group
    per replica, leader and workers from the same pod template, the whole group recreated when any
    of its pods restarts (a worker is all its ranks or nothing)."""
    template = deployment["spec"]["template"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {**deployment["metadata"], "name": set_name(deployment["metadata"]["name"])},
        "spec": {
            "replicas": deployment["spec"]["replicas"],
            # LeaderCreated: workers start with the leader, not after it is Ready; the leader is
            # Ready only once every rank has joined it.
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
            "networkConfig": {"subdomainPolicy": "Shared"},
            "leaderWorkerTemplate": {
                "size": pods_per_replica(role),
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": template,
                "workerTemplate": template,
            },
        },
    }  # fmt: skip


class GroupPod(BaseModel):
    """One pod of a LeaderWorkerSet group, as the partial-group check needs it."""

    role: str = Field(description="kvrelay.dev/role")
    group: str = Field(description="The group: the leader's name, <lws>-<group>.")
    scheduled: bool = Field(description="Bound to a node (spec.nodeName set).")
    ready: bool = Field(default=False, description="Condition Ready is True.")

    @classmethod
    def from_body(cls, body: dict[str, Any], role: str) -> GroupPod | None:
        """Reads a pod of a LeaderWorkerSet; None for any other pod."""
        meta = body.get("metadata") or {}
        labels = meta.get("labels") or {}
        lws = labels.get(SET_NAME_LABEL)
        if not lws:
            return None
        # The group from the name: the webhook's group-index label may be missing (it failed open
        # nowhere, but a leader's name is <lws>-<group> and a worker's <lws>-<group>-<index>).
        rest = (meta.get("name") or "").removeprefix(f"{lws}-")
        group = labels.get(GROUP_INDEX_LABEL) or rest.split("-")[0]
        conditions = (body.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        scheduled = bool((body.get("spec") or {}).get("nodeName"))
        return cls(role=role, group=f"{lws}-{group}", scheduled=scheduled, ready=ready)


def incomplete_groups(pods: list[GroupPod], size_by_role: dict[str, int]) -> dict[str, str]:
    """role -> why its groups are only partly placed ('' absent when all are whole or none started).

    A group counts as incomplete when some but not all of its `size` pods are bound to nodes: its
    scheduled pods hold GPUs while serving nothing. A group with no pod scheduled holds nothing (the
    Unschedulable condition already says why); one whose pods are not all created yet is still
    being made by the LWS controller and counts by the pods that exist.
    """
    groups: dict[tuple[str, str], list[GroupPod]] = {}
    for pod in pods:
        if pod.role in size_by_role:
            groups.setdefault((pod.role, pod.group), []).append(pod)
    out: dict[str, list[str]] = {}
    for (role, group), members in sorted(groups.items()):
        size = size_by_role[role]
        placed = sum(p.scheduled for p in members)
        if 0 < placed < size:
            out.setdefault(role, []).append(f"group {group} has {placed} of {size} pods scheduled")
    return {role: f"{'; '.join(lines)}; {GANG_ADVICE}" for role, lines in out.items()}


def ready_groups(pods: list[GroupPod], size_by_role: dict[str, int]) -> dict[str, int]:
    """role -> groups all of whose `size` pods are Ready.

    Counted from the pods because LWS v0.7.0's status.readyReplicas counts a group once its leader is
    Ready and its worker StatefulSet has created its pods, placed or not (StatefulsetReady compares
    spec.replicas with status.replicas): a group missing a node would look ready.
    """
    members: dict[tuple[str, str], list[GroupPod]] = {}
    for pod in pods:
        if pod.role in size_by_role:
            members.setdefault((pod.role, pod.group), []).append(pod)
    out = dict.fromkeys(size_by_role, 0)
    for (role, _), group in members.items():
        if len(group) >= size_by_role[role] and all(p.ready for p in group):
            out[role] += 1
    return out
