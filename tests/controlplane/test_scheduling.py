"""Scheduling on a cluster on one machine: kube-apiserver, kube-controller-manager, kube-scheduler and
kwok fake GPU node pools, with the operator in process.

Nothing writes Deployment or pod status by hand here: the deployment/replicaset controllers make pods,
the scheduler places them, kwok plays their kubelet (Running/Ready without containers), and the
disruption, endpointslice and pod-GC controllers do the rest.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kvrelay_envtest import (
    REPO_ROOT,
    ControlPlane,
    control_plane,
    example,
    find_assets,
    find_kubectl,
    wait_for,
)
from kvrelay_operator import main
from kwok_nodes import (
    KWOK_ANNOTATION,
    POD_CIDR,
    POOL_LABEL,
    add_kwok_nodes,
    cpu_node,
    find_kwok,
    gpu_node,
    node_manifest,
    start_kwok,
)

pytestmark = pytest.mark.controlplane

MODEL = "llama-3-8b"
STUCK_MODEL = "too-wide"
PREFILL_POOL, DECODE_POOL, SYSTEM_POOL = "prefill-h100", "decode-l40s", "system"
POOL_BY_ROLE = {"prefill": PREFILL_POOL, "decode": DECODE_POOL, "router": SYSTEM_POOL}
REPLICAS = {"prefill": 2, "decode": 4, "router": 2}
# 3 decode nodes x 4 GPUs hold the 4 TP2 decode pods with room for any one node's pods elsewhere.
NODES = [
    gpu_node("h100-0", PREFILL_POOL, 8, zone="zone-a"),
    gpu_node("h100-1", PREFILL_POOL, 8, zone="zone-b"),
    gpu_node("l40s-0", DECODE_POOL, 4, zone="zone-a"),
    gpu_node("l40s-1", DECODE_POOL, 4, zone="zone-b"),
    gpu_node("l40s-2", DECODE_POOL, 4, zone="zone-c"),
    cpu_node("system-0", SYSTEM_POOL),
]
HANDLER_MODULES = [arg for module in main.HANDLER_MODULES for arg in ("-m", module)]


@dataclass
class Cluster:
    """The running cluster, an API client for it and the namespaces the operator watches."""

    cp: ControlPlane
    core: k8s.CoreV1Api
    namespace: str  # the llama-3-8b example's
    stuck_namespace: str  # a model the scheduler cannot place

    def get(self, path: str) -> dict[str, Any]:
        """GET an API path as JSON."""
        return self.cp.request("GET", path)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A control plane with controllers, kwok and the node pools; CRDs applied; the operator running."""
    assets, reason = find_assets(controllers=True)
    if assets is None:
        pytest.skip(reason)
    kwok, reason = find_kwok(assets)
    if kwok is None:
        pytest.skip(reason)
    kubectl_binary, reason = find_kubectl()
    if kubectl_binary is None:
        pytest.skip(reason)
    with control_plane(assets, controllers=True) as cp:
        start_kwok(cp, kwok)
        add_kwok_nodes(cp, NODES)
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        subprocess.run([str(kubectl_binary), "apply", "-f", str(REPO_ROOT / "crds")],
                       check=True, capture_output=True, env=env, timeout=60)  # fmt: skip
        namespaces = [f"s-{uuid.uuid4().hex[:8]}" for _ in range(2)]
        for ns in namespaces:
            cp.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
            # Pods are admitted only once the serviceaccount controller made the namespace's `default`.
            wait_for(lambda ns=ns: cp.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default"),
                     timeout=30, what=f"{ns}/default ServiceAccount")  # fmt: skip
        wait_for(_crd_established(cp), timeout=30, what="CRD Established")
        api_client = k8s_config.new_client_from_config(config_file=str(cp.kubeconfig))
        # The operator (kopf login and its own client) reads KUBECONFIG when it starts; another
        # module's session cluster may own it meanwhile, so it is put back afterwards.
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        try:
            args = ["run", "--standalone", *(a for ns in namespaces for a in ("--namespace", ns))]
            with KopfRunner([*args, *HANDLER_MODULES], timeout=60) as runner:
                yield Cluster(cp, k8s.CoreV1Api(api_client), *namespaces)
        finally:
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous
            api_client.close()
        assert runner.exception is None, runner.output[-3000:]
        assert runner.exit_code == 0, runner.output[-3000:]
        assert "failed with an exception" not in runner.output, runner.output[-3000:]


def _crd_established(cp: ControlPlane) -> Any:
    def established() -> bool:
        crd = cp.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                "disaggregatedmodels.kvrelay.dev")  # fmt: skip
        conditions = crd.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    return established


def _apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    """Creates the DisaggregatedModel as a user would (the CRD's validation applies)."""
    cluster.cp.request("POST", f"/apis/kvrelay.dev/v1alpha1/namespaces/{namespace}/disaggregatedmodels",
                       manifest)  # fmt: skip


def _model(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.get(f"/apis/kvrelay.dev/v1alpha1/namespaces/{namespace}/disaggregatedmodels/{name}")


def _pods(cluster: Cluster, namespace: str, model: str, role: str) -> list[k8s.V1Pod]:
    selector = f"app.kubernetes.io/instance={model},kvrelay.dev/role={role}"
    return cluster.core.list_namespaced_pod(namespace, label_selector=selector).items


def _ready(pod: k8s.V1Pod) -> bool:
    conditions = {c.type: c.status for c in pod.status.conditions or []}
    live = pod.metadata.deletion_timestamp is None and pod.status.phase == "Running"
    return live and conditions.get("Ready") == "True"


def _all_ready(
    cluster: Cluster, role: str, count: int, namespace: str = "", model: str = MODEL
) -> list[k8s.V1Pod] | None:
    """The role's pods when exactly `count` exist and all are Running/Ready (none terminating), else None."""
    pods = _pods(cluster, namespace or cluster.namespace, model, role)
    return pods if len(pods) == count and all(_ready(p) for p in pods) else None


def _pool(cluster: Cluster, node: str) -> str:
    return cluster.get(f"/api/v1/nodes/{node}")["metadata"]["labels"][POOL_LABEL]


def _pdb(cluster: Cluster, role: str) -> dict[str, Any]:
    return cluster.get(f"/apis/policy/v1/namespaces/{cluster.namespace}/poddisruptionbudgets/{MODEL}-{role}")


def _pdb_allows_one(cluster: Cluster, role: str) -> bool:
    """The disruption controller has seen every pod of the role healthy again."""
    pdb = _pdb(cluster, role)
    status = pdb.get("status") or {}
    return (
        status.get("observedGeneration") == pdb["metadata"]["generation"]
        and status.get("currentHealthy") == REPLICAS[role]
        and status.get("disruptionsAllowed") == 1
    )


def _cordon(cluster: Cluster, nodes: list[str], unschedulable: bool) -> None:
    for node in nodes:
        cluster.cp.request("PATCH", f"/api/v1/nodes/{node}", {"spec": {"unschedulable": unschedulable}},
                           content_type="application/merge-patch+json")  # fmt: skip


def _evict(cluster: Cluster, pod: str) -> None:
    body = k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=pod, namespace=cluster.namespace))
    cluster.core.create_namespaced_pod_eviction(pod, cluster.namespace, body)


@pytest.fixture(scope="module")
def llama(cluster: Cluster) -> Cluster:
    """examples/llama-3-8b.yaml applied and all its pods Running/Ready."""
    _apply(cluster, cluster.namespace, yaml.safe_load(example("llama-3-8b.yaml")))
    for role, count in REPLICAS.items():
        wait_for(lambda role=role, count=count: _all_ready(cluster, role, count), timeout=60,
                 interval=0.3, what=f"{count} {role} pods Ready")  # fmt: skip
    return cluster


def test_roles_land_on_their_pools_and_the_model_goes_ready(llama: Cluster) -> None:
    ns = llama.namespace
    for role, count in REPLICAS.items():
        pods = _all_ready(llama, role, count)
        assert pods is not None, role
        assert {_pool(llama, p.spec.node_name) for p in pods} == {POOL_BY_ROLE[role]}, role
        # kwok hands out pod IPs from its --cidr, as a CNI would.
        assert all(ipaddress.ip_address(p.status.pod_ip) in ipaddress.ip_network(POD_CIDR) for p in pods)
    # The preferred anti-affinity spreads the decode replicas: no 4-GPU node holds more than 2.
    decode_nodes = Counter(p.spec.node_name for p in _pods(llama, ns, MODEL, "decode"))
    assert len(decode_nodes) == 3 and max(decode_nodes.values()) == 2, decode_nodes

    def model_ready() -> dict[str, Any] | None:
        status = _model(llama, ns, MODEL).get("status") or {}
        return status if status.get("phase") == "Ready" else None

    status = wait_for(model_ready, timeout=30, what="model phase Ready")
    assert [status[r]["readyReplicas"] for r in REPLICAS] == [2, 4, 2]
    # The deployment controller, not a test, wrote these.
    for role, count in REPLICAS.items():
        deployment = llama.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{MODEL}-{role}")
        assert deployment["status"]["readyReplicas"] == count, role

    # The endpointslice controller publishes the headless decode Service's ready pods, which is
    # what the router discovers workers by.
    def decode_endpoints() -> dict[str, str] | None:
        slices = llama.get(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
                           f"?labelSelector=kubernetes.io/service-name={MODEL}-decode")["items"]  # fmt: skip
        ready = {e["addresses"][0]: e["nodeName"] for s in slices for e in s.get("endpoints") or []
                 if e["conditions"].get("ready")}  # fmt: skip
        return ready if len(ready) == 4 else None

    endpoints = wait_for(decode_endpoints, timeout=30, what="4 ready decode endpoints")
    pods = _pods(llama, ns, MODEL, "decode")
    assert endpoints == {p.status.pod_ip: p.spec.node_name for p in pods}


def test_a_pod_wider_than_every_node_of_its_pool_stays_pending(cluster: Cluster) -> None:
    manifest = yaml.safe_load(example("llama-3-8b.yaml"))
    manifest["metadata"]["name"] = STUCK_MODEL
    spec = manifest["spec"]
    spec["prefill"].update(replicas=1, minReplicas=1)
    # TP 8 on the decode pool's 4-GPU nodes; the 8-GPU prefill nodes are outside its nodeSelector.
    spec["decode"].update(replicas=1, minReplicas=1, tensorParallel=8)
    spec["router"]["replicas"] = 1
    _apply(cluster, cluster.stuck_namespace, manifest)

    def unschedulable() -> dict[str, Any] | None:
        for pod in _pods(cluster, cluster.stuck_namespace, STUCK_MODEL, "decode"):
            for cond in pod.status.conditions or []:
                if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
                    return {"pod": pod, "message": cond.message}
        return None

    found = wait_for(unschedulable, timeout=60, interval=0.3, what="decode pod PodScheduled=False")
    pod = found["pod"]
    assert pod.spec.node_name is None and pod.status.phase == "Pending"
    assert pod.spec.containers[0].resources.requests["nvidia.com/gpu"] == "8"
    # The scheduler's own words, e.g. "0/6 nodes are available: 3 Insufficient nvidia.com/gpu, ...".
    assert "Insufficient nvidia.com/gpu" in found["message"], found["message"]
    # The rest of the model is placeable and placed: the failure is the decode pods' alone.
    prefill = wait_for(lambda: _all_ready(cluster, "prefill", 1, cluster.stuck_namespace, STUCK_MODEL),
                       timeout=60, what="the stuck model's prefill pod Ready")  # fmt: skip
    assert _pool(cluster, prefill[0].spec.node_name) == PREFILL_POOL

    # The model's status says why, in the scheduler's words, without anyone reading pods.
    def explained() -> dict[str, Any] | None:
        status = (
            cluster.get(
                f"/apis/kvrelay.dev/v1alpha1/namespaces/{cluster.stuck_namespace}/disaggregatedmodels/{STUCK_MODEL}"
            ).get("status")
            or {}
        )
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        scheduled = conditions.get("PodsScheduled") or {}
        return conditions if scheduled.get("status") == "False" else None

    conditions = wait_for(explained, timeout=60, interval=0.5, what="condition PodsScheduled=False")
    assert conditions["PodsScheduled"]["reason"] == "Unschedulable"
    assert conditions["PodsScheduled"]["message"].startswith("decode: 1 pod unschedulable: ")
    assert "Insufficient nvidia.com/gpu" in conditions["PodsScheduled"]["message"]
    assert conditions["Ready"]["status"] == "False"
    assert "decode 0/1 ready (1 pod unschedulable: " in conditions["Ready"]["message"]


def test_evictions_respect_the_pod_disruption_budget(llama: Cluster) -> None:
    assert _pdb(llama, "decode")["spec"]["maxUnavailable"] == 1
    wait_for(lambda: _pdb_allows_one(llama, "decode"), timeout=30, what="decode PDB allows 1 disruption")
    pods = _pods(llama, llama.namespace, MODEL, "decode")
    first, second = sorted(p.metadata.name for p in pods)[:2]
    # Cordoned, as `kubectl drain` does first: the evicted pod's replacement then stays Pending, where
    # kwok would otherwise make it Ready within ~0.1 s and race the second eviction.
    decode_nodes = sorted({p.spec.node_name for p in pods})
    _cordon(llama, decode_nodes, True)
    try:
        _evict(llama, first)
        with pytest.raises(ApiException) as refused:
            _evict(llama, second)
        assert refused.value.status == 429, refused.value
        assert "disruption budget" in str(refused.value.body), refused.value.body

        def replacement_pending() -> bool:
            names = {p.metadata.name for p in _pods(llama, llama.namespace, MODEL, "decode")}
            return first not in names and len(names) == 4 and _all_ready(llama, "decode", 4) is None

        # Still refused once the replacement exists but cannot be placed: the budget stays spent.
        wait_for(replacement_pending, timeout=30, what=f"{first} gone and its replacement Pending")
        with pytest.raises(ApiException) as refused_again:
            _evict(llama, second)
        assert refused_again.value.status == 429, refused_again.value
    finally:
        _cordon(llama, decode_nodes, False)

    # Placed and Ready again, the replacement gives the budget back.
    wait_for(lambda: _all_ready(llama, "decode", 4), timeout=60, interval=0.2, what="replacement Ready")
    wait_for(lambda: _pdb_allows_one(llama, "decode"), timeout=30, what="decode PDB allows 1 again")
    _evict(llama, second)
    pods = wait_for(lambda: _all_ready(llama, "decode", 4), timeout=60, interval=0.2,
                    what="second evicted pod replaced")  # fmt: skip
    assert not {first, second} & {p.metadata.name for p in pods}
    assert {_pool(llama, p.spec.node_name) for p in pods} == {DECODE_POOL}


def test_deleting_a_node_reschedules_its_pods(llama: Cluster) -> None:
    pods = wait_for(lambda: _all_ready(llama, "decode", 4), timeout=60, what="4 decode pods Ready")
    victim, _ = Counter(p.spec.node_name for p in pods).most_common(1)[0]
    orphans = {p.metadata.name for p in pods if p.spec.node_name == victim}
    llama.cp.request("DELETE", f"/api/v1/nodes/{victim}")

    # The pod GC controller deletes pods bound to a missing node after a 40 s quarantine (checked
    # every 20 s); the replica set then makes new ones, which fit on the other two decode nodes.
    def rescheduled() -> list[k8s.V1Pod] | None:
        current = _all_ready(llama, "decode", 4)
        if current is None or orphans & {p.metadata.name for p in current}:
            return None
        return current

    pods = wait_for(rescheduled, timeout=150, interval=0.5, what=f"decode pods of {victim} rescheduled")
    nodes = {p.spec.node_name for p in pods}
    assert victim not in nodes and {_pool(llama, n) for n in nodes} == {DECODE_POOL}, nodes
    status = wait_for(
        lambda: (s := _model(llama, llama.namespace, MODEL).get("status") or {}).get("phase") == "Ready"
        and s["decode"]["readyReplicas"] == 4 and s,
        timeout=30, what="model Ready with 4 decode replicas",
    )  # fmt: skip
    assert status["decode"]["readyReplicas"] == 4


def test_kwok_leaves_nodes_without_its_annotation_alone(cluster: Cluster) -> None:
    # A real node agent's node: no kwok annotation. kwok must neither report it Ready nor run its pods.
    spec = cpu_node("real-0", "agent")
    manifest = node_manifest(spec)
    del manifest["metadata"]["annotations"]
    cluster.cp.request("POST", "/api/v1/nodes", manifest)
    pod = {
        "metadata": {"name": "pinned"},
        "spec": {"nodeName": "real-0", "containers": [{"name": "c", "image": "busybox"}]},
    }
    cluster.cp.request("POST", f"/api/v1/namespaces/{cluster.stuck_namespace}/pods", pod)
    # A kwok node is Ready and its pods Running well within a second (see the tests above).
    time.sleep(3)
    # (The node lifecycle controller would add Ready=Unknown only after its 50 s grace period.)
    node = cluster.get("/api/v1/nodes/real-0")
    assert not node["status"].get("conditions"), node["status"]
    status = cluster.get(f"/api/v1/namespaces/{cluster.stuck_namespace}/pods/pinned")["status"]
    assert status.get("phase") == "Pending" and not status.get("containerStatuses"), status
    # kwok holds a Lease for each node it manages (its heartbeat), and none for real-0.
    leases = cluster.get("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases")["items"]
    held = {lease["metadata"]["name"] for lease in leases}
    key, value = KWOK_ANNOTATION
    fake = {n["metadata"]["name"] for n in cluster.get("/api/v1/nodes")["items"]
            if (n["metadata"].get("annotations") or {}).get(key) == value}  # fmt: skip
    assert fake and fake <= held and "real-0" not in held, (fake, held)
