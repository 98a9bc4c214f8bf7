"""Tests 2, 4, 5 and the autoscaler hook: the operator, in process, against a real control plane.

Deployments make pods through the real controllers, the scheduler places them on kwok's fake GPU
node pools (conftest.py) and kwok makes them Ready: Deployment status is never written by a test.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from typing import Any

import pytest
import yaml
from kvrelay_envtest import ControlPlane, example, get_json, wait_for
from kvrelay_operator import handlers

pytestmark = pytest.mark.controlplane

LABELS = "app.kubernetes.io/name=kvrelay"
CHILD_KINDS = (
    "configmaps,services,deployments,poddisruptionbudgets,serviceaccounts,roles,rolebindings,networkpolicies"
)
OWNER = {"apiVersion": "kvrelay.dev/v1alpha1", "kind": "DisaggregatedModel", "controller": True,
         "blockOwnerDeletion": True}  # fmt: skip


def children(kubectl, namespace: str, instance: str) -> dict[str, dict[str, Any]]:
    """Kind/name -> object for every child of a model."""
    items = get_json(
        kubectl, CHILD_KINDS, "-n", namespace, "-l", f"{LABELS},app.kubernetes.io/instance={instance}"
    )
    return {f"{i['kind']}/{i['metadata']['name']}": i for i in items["items"]}


def deployment(kubectl, namespace: str, name: str) -> dict[str, Any]:
    return get_json(kubectl, "deployment", name, "-n", namespace)


def model(kubectl, namespace: str, name: str) -> dict[str, Any]:
    return get_json(kubectl, "dm", name, "-n", namespace)


def pods(kubectl, namespace: str, instance: str, role: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={instance},kvrelay.dev/role={role}"
    return get_json(kubectl, "pods", "-n", namespace, "-l", selector)["items"]


EXPECTED_CHILDREN = {
    "ServiceAccount/llama-3-8b-router", "Role/llama-3-8b-router",
    "RoleBinding/llama-3-8b-router",
    *(f"{kind}/llama-3-8b-{role}"
      for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy")
      for role in ("prefill", "decode", "router")),
}  # fmt: skip


def test_valid_cr_yields_children_and_status(kubectl, namespace, operator) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=example("llama-3-8b.yaml"), check=True)
    found = wait_for(
        lambda: (c := children(kubectl, namespace, "llama-3-8b")) and set(c) == EXPECTED_CHILDREN and c,
        timeout=30, what="all 15 children",
    )  # fmt: skip
    parent = model(kubectl, namespace, "llama-3-8b")
    for key, child in found.items():
        assert child["metadata"]["ownerReferences"] == [{**OWNER, "name": "llama-3-8b",
                                                         "uid": parent["metadata"]["uid"]}], key  # fmt: skip
        assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "llama-3-8b", key
    for role, pool, gpus, replicas in (
        ("prefill", "prefill-h100", "2", 2),
        ("decode", "decode-l40s", "2", 4),
    ):
        d = found[f"Deployment/llama-3-8b-{role}"]
        pod = d["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert d["metadata"]["labels"]["kvrelay.dev/role"] == role
        assert d["spec"]["replicas"] == replicas
        assert pod["nodeSelector"] == {"kvrelay.dev/node-pool": pool}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["limits"]["rdma/ib"] == "1"  # transport: rdma
        assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert container["image"] == handlers.DEFAULT_WORKER_IMAGE
        assert container["args"][:2] == ["--role", role]
    assert found["Service/llama-3-8b-prefill"]["spec"]["clusterIP"] == "None"
    assert "nvidia.com/gpu" not in json.dumps(found["Deployment/llama-3-8b-router"]["spec"])

    def created_event() -> list[dict[str, Any]]:
        selector = "involvedObject.name=llama-3-8b,reason=Created"
        return get_json(kubectl, "events", "-n", namespace, "--field-selector", selector)["items"]

    assert "applied 15 children" in wait_for(created_event, timeout=30, what="Created event")[0]["message"]

    def settled() -> dict[str, Any] | None:
        status = model(kubectl, namespace, "llama-3-8b").get("status") or {}
        return status if status.get("phase") == "Ready" else None

    status = wait_for(settled, timeout=30, what="phase Ready")
    assert status["observedGeneration"] == parent["metadata"]["generation"]
    assert [status[r]["readyReplicas"] for r in ("prefill", "decode", "router")] == [2, 4, 2]
    assert [status[r]["desiredReplicas"] for r in ("prefill", "decode", "router")] == [2, 4, 2]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Progressing"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "False"
    assert status["routerEndpoint"] == f"http://llama-3-8b-router.{namespace}.svc:8000/v1"
    row = kubectl("get", "dm", "llama-3-8b", "-n", namespace, "--no-headers", check=True).stdout.split()
    assert row[:6] == ["llama-3-8b", "2", "2", "4", "4", "Ready"]

    for pod in pods(kubectl, namespace, "llama-3-8b", "decode"):
        assert pod["spec"]["nodeSelector"] == {"kvrelay.dev/node-pool": "decode-l40s"}
        assert pod["status"]["phase"] == "Running"

    # Three decode pods lost while their pool is cordoned: their replacements cannot be placed.
    pool = get_json(kubectl, "nodes", "-l", "kvrelay.dev/node-pool=decode-l40s")["items"]
    decode_nodes = [n["metadata"]["name"] for n in pool]
    try:
        for node in decode_nodes:
            kubectl("cordon", node, check=True)
        doomed = sorted(p["metadata"]["name"] for p in pods(kubectl, namespace, "llama-3-8b", "decode"))[:3]
        kubectl("delete", "pod", "-n", namespace, *doomed, "--wait=false", check=True)

        def progressing() -> dict[str, Any] | None:
            status = model(kubectl, namespace, "llama-3-8b")["status"]
            conditions = {c["type"]: c for c in status["conditions"]}
            stuck = conditions["PodsScheduled"]["status"] == "False"
            # All three: the scheduler marks the replacements Unschedulable one at a time, and a status
            # written between two of them rightly says "1 pod unschedulable" for a moment.
            message = conditions["Ready"]["message"]
            return conditions if stuck and "decode 1/4 ready (3 pods unschedulable" in message else None

        conditions = wait_for(progressing, timeout=60, what="decode pods unschedulable in status")
        assert model(kubectl, namespace, "llama-3-8b")["status"]["phase"] == "Progressing"
        assert "decode 1/4 ready (3 pods unschedulable: " in conditions["Ready"]["message"]
        assert "unschedulable" in conditions["PodsScheduled"]["message"]
    finally:
        for node in decode_nodes:
            kubectl("uncordon", node)
    # Placed again once the pool is back: the condition clears by itself.
    wait_for(settled, timeout=60, what="phase Ready again after uncordon")


TINY = yaml.safe_load(example("tiny.yaml"))


# Resources of a model and its children; the API server's own request counters for them tell
# what the operator sent, kopf's own writes included, without asking the operator.
OUR_RESOURCES = {"disaggregatedmodels", *CHILD_KINDS.split(","), "events"}
# User agents of the control plane's own components (kvrelay_envtest, kwok_nodes).
CLUSTER_COMPONENTS = ("kube-controller-manager/", "kube-scheduler/", "kwok/", "kube-apiserver/")
METRIC_RE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def apiserver_requests(cluster: ControlPlane) -> Counter[tuple[str, str]]:
    """(verb, resource) -> requests the API server has served for our resources (its /metrics)."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in cluster.get("/metrics", timeout=30).decode().splitlines():
        if match := METRIC_RE.match(line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            if labels.get("resource") in OUR_RESOURCES:
                counts[(labels["verb"], labels["resource"])] += int(float(match["value"]))
    return counts


def versions(kubectl, namespace: str, name: str) -> dict[str, str]:
    """Kind/name -> resourceVersion of a model and each of its children."""
    found = {k: c["metadata"]["resourceVersion"] for k, c in children(kubectl, namespace, name).items()}
    found[f"DisaggregatedModel/{name}"] = model(kubectl, namespace, name)["metadata"]["resourceVersion"]
    return found


def wait_settled(kubectl, namespace: str, name: str, quiet_s: float = 2.0, timeout: float = 30.0) -> None:
    """Until neither the model nor any child has changed for quiet_s (the operator is done with them)."""
    last: list[dict[str, str]] = [{}]
    since = [0.0]

    def settled() -> bool:
        now, current = time.monotonic(), versions(kubectl, namespace, name)
        if current != last[0]:
            last[0], since[0] = current, now
        return now - since[0] >= quiet_s

    wait_for(settled, timeout=timeout, interval=0.2, what=f"{name} settled")


def rolled_out(kubectl, namespace: str, instance: str) -> bool:
    """Every Deployment of the model has all its replicas updated and ready, and no old pod left."""
    for role in ("prefill", "decode", "router"):
        d = deployment(kubectl, namespace, f"{instance}-{role}")
        want, status = d["spec"]["replicas"], d.get("status") or {}
        counts = [
            status.get(k, 0) for k in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas")
        ]
        if status.get("observedGeneration") != d["metadata"]["generation"] or counts != [want] * 4:
            return False
        if len(pods(kubectl, namespace, instance, role)) != want:
            return False
    return True


def test_spec_edit_rolls_children_and_restart_writes_nothing(
    cluster: ControlPlane, kubectl, namespace, start_operator
) -> None:
    with start_operator():
        kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TINY), check=True)
        wait_for(lambda: len(children(kubectl, namespace, "tiny")) == 15, timeout=30, what="children")
        before = deployment(kubectl, namespace, "tiny-decode")
        edited = json.loads(json.dumps(TINY))
        edited["spec"]["image"] = "registry.example/kvrelay:2"
        # To another pool the scheduler can fill (conftest.NODE_POOLS), so the rollout completes.
        selector = {"kvrelay.dev/node-pool": "untainted-gpu"}
        edited["spec"]["decode"].update(replicas=3, tensorParallel=2, nodeSelector=selector)
        kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(edited), check=True)

        def rolled() -> dict[str, Any] | None:
            d = deployment(kubectl, namespace, "tiny-decode")
            pod = d["spec"]["template"]["spec"]
            ok = (d["spec"]["replicas"] == 3 and pod["nodeSelector"] == selector
                  and pod["containers"][0]["image"] == "registry.example/kvrelay:2"
                  and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2")  # fmt: skip
            return d if ok else None

        after = wait_for(rolled, timeout=30, what="decode Deployment updated")
        # A new pod template (config hash, image) is what makes the Deployment roll.
        assert after["metadata"]["generation"] > before["metadata"]["generation"]
        prefill = deployment(kubectl, namespace, "tiny-prefill")["spec"]["template"]["spec"]["containers"][0]
        assert prefill["image"] == "registry.example/kvrelay:2"
        wait_for(lambda: model(kubectl, namespace, "tiny").get("status", {}).get("observedGeneration") == 2,
                 timeout=30, what="observedGeneration 2")  # fmt: skip
        # The controllers finish the rollout (new pods Ready, old ones gone) and stop writing; then
        # the status mirror catches up with the last events.
        wait_for(lambda: rolled_out(kubectl, namespace, "tiny"), timeout=90, what="rollout complete")
        wait_settled(kubectl, namespace, "tiny")

    before_restart = versions(kubectl, namespace, "tiny")
    assert len(before_restart) == 16  # 15 children + the model
    requests_before = apiserver_requests(cluster)
    so_far, audit_offset = cluster.writes()
    # The filter below would see the operator: its writes so far are in the audit log, under its agent.
    operator_writes = {
        (e["objectRef"].get("resource"), e["objectRef"].get("subresource"))
        for e in so_far
        if e["objectRef"].get("namespace") == namespace
        and not e.get("userAgent", "").startswith(CLUSTER_COMPONENTS)
    }
    assert {("deployments", None), ("disaggregatedmodels", "status")} <= operator_writes, operator_writes
    with start_operator():
        # The resume compares against the live children: one labelled LIST per child kind. kopf
        # itself watches only models and Deployments, and the test lists nothing meanwhile, so a
        # LIST of ServiceAccounts (the last kind looked up) is the resume at work.
        wait_for(
            lambda: (apiserver_requests(cluster) - requests_before)[("LIST", "serviceaccounts")] > 0,
            timeout=30, what="the resume's lookup of live children",
        )  # fmt: skip
        wait_settled(kubectl, namespace, "tiny")
    # Writes by anyone but the cluster's own components (the controllers keep their objects' status
    # current, and other tests' namespaces are being deleted meanwhile): the operator's.
    events, _ = cluster.writes(audit_offset)
    writes = [
        (e["verb"], e["objectRef"].get("resource"), e["objectRef"].get("namespace"), e.get("userAgent", ""))
        for e in events
        if not e.get("userAgent", "").startswith(CLUSTER_COMPONENTS)
    ]
    assert writes == [], writes
    assert versions(kubectl, namespace, "tiny") == before_restart


def test_hand_scaled_deployment_is_restored(kubectl, namespace, operator) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TINY), check=True)
    # Scaled as soon as it exists, while the creation's reconcile may still be writing its status:
    # the DriftCorrected condition must survive that write (conditional on resourceVersion).
    wait_for(lambda: deployment(kubectl, namespace, "tiny-decode"), timeout=30, what="decode Deployment")
    kubectl("scale", "deployment/tiny-decode", "-n", namespace, "--replicas=5", check=True)
    wait_for(lambda: deployment(kubectl, namespace, "tiny-decode")["spec"]["replicas"] == 1, timeout=30,
             what="replicas restored to 1")  # fmt: skip

    def restored_event() -> list[dict[str, Any]]:
        events = get_json(kubectl, "events", "-n", namespace, "--field-selector",
                          "involvedObject.name=tiny,reason=ReplicasRestored")["items"]  # fmt: skip
        return events

    event = wait_for(restored_event, timeout=30, what="ReplicasRestored event")[0]
    assert event["type"] == "Warning" and event["involvedObject"]["kind"] == "DisaggregatedModel"
    assert "scaled to 5" in event["message"] and "restored to 1" in event["message"]

    def drift_condition() -> dict[str, Any] | None:
        conditions = model(kubectl, namespace, "tiny").get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "DriftCorrected"), None)

    condition = wait_for(drift_condition, timeout=30, what="DriftCorrected condition")
    assert condition["status"] == "True" and condition["reason"] == "ReplicasRestored"

    # A child deleted by hand comes back (new uid), and the parent says so.
    old_uid = deployment(kubectl, namespace, "tiny-prefill")["metadata"]["uid"]
    kubectl("delete", "deployment", "tiny-prefill", "-n", namespace, "--wait=false", check=True)
    wait_for(lambda: deployment(kubectl, namespace, "tiny-prefill")["metadata"]["uid"] != old_uid, timeout=30,
             what="prefill Deployment re-created")  # fmt: skip
    selector = ("--field-selector", "involvedObject.name=tiny,reason=ChildRecreated")
    wait_for(lambda: get_json(kubectl, "events", "-n", namespace, *selector)["items"], timeout=15,
             what="a ChildRecreated event")  # fmt: skip


def test_status_write_keeps_a_condition_written_since_the_model_was_read(kubectl, kube, namespace) -> None:
    """A handler's status write names the version it computed from; on a conflict it re-reads and
    recomputes, so a condition another writer added meanwhile is kept (a merge patch replaces lists)."""
    from kvrelay_operator.status import set_condition, status_merge_patch

    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TINY), check=True)
    stale = kube.get_model(namespace, "tiny")  # what a handler read when it started
    stale_status = handlers._parse_status(stale)
    at = "2026-01-01T00:00:00Z"
    drift = set_condition([], "DriftCorrected", "True", "ReplicasRestored", "restored", at, 1)
    written = [c.model_dump(by_alias=True, exclude_none=True, mode="json") for c in drift]
    kube.patch_status(namespace, "tiny", {"conditions": written})  # another writer, after that read

    def ready_false(parent: dict[str, Any]) -> Any:
        current = handlers._parse_status(parent)
        conditions = set_condition(current.conditions, "Ready", "False", "Pending", "waiting",
                                   "2026-01-01T00:00:01Z", 1)  # fmt: skip
        return current.model_copy(update={"conditions": conditions})

    state = handlers.OperatorState(kube, handlers.OperatorConfig())
    assert handlers._write_status(state, stale, ready_false)
    types = {c["type"] for c in model(kubectl, namespace, "tiny")["status"]["conditions"]}
    assert types == {"DriftCorrected", "Ready"}
    # What an unconditional patch from the stale read does (kopf's end-of-handler patch did this):
    # the list it sends replaces the condition written since. This is the failure the above avoids.
    kube.patch_status(namespace, "tiny", status_merge_patch(stale_status, ready_false(stale)))
    types = {c["type"] for c in model(kubectl, namespace, "tiny")["status"]["conditions"]}
    assert types == {"Ready"}


def test_autoscaler_status_drives_replicas(kubectl, kube, namespace, operator) -> None:
    """The autoscaler hook: in mode auto, status.<role>.desiredReplicas is applied, clamped to bounds."""
    auto = json.loads(json.dumps(TINY))
    auto["spec"]["autoscaling"] = {"mode": "auto", "intervalSeconds": 3600}
    auto["spec"]["decode"].update(minReplicas=1, maxReplicas=4)
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(auto), check=True)
    wait_for(
        lambda: model(kubectl, namespace, "tiny").get("status", {}).get("observedGeneration"),
        timeout=30, what="first reconcile",
    )  # fmt: skip
    if "kvrelay_operator.autoscaler.kopf_timer" in sys.modules:
        # The real autoscaler timer runs with the handlers (as in kvrelay-operator): let its first
        # decision (a hold: no Prometheus here) pass; the next is an hour away. Then play its part.
        def decided() -> str | None:
            return (model(kubectl, namespace, "tiny")["status"].get("autoscaler") or {}).get(
                "lastDecisionTime"
            )

        wait_for(decided, timeout=30, what="the autoscaler's first decision")
    kube.patch_status(namespace, "tiny", {"decode": {"desiredReplicas": 3}})
    wait_for(lambda: deployment(kubectl, namespace, "tiny-decode")["spec"]["replicas"] == 3, timeout=30,
             what="decode scaled to 3")  # fmt: skip
    kube.patch_status(namespace, "tiny", {"decode": {"desiredReplicas": 9}})
    wait_for(lambda: deployment(kubectl, namespace, "tiny-decode")["spec"]["replicas"] == 4, timeout=30,
             what="decode clamped to maxReplicas 4")  # fmt: skip

    def limited() -> dict[str, Any] | None:
        conditions = model(kubectl, namespace, "tiny").get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "ScalingLimited" and c["status"] == "True"), None)

    condition = wait_for(limited, timeout=30, what="ScalingLimited")
    assert "decode wants 9, clamped to 4" in condition["message"]
    # The autoscaler's value is kept, never overwritten by the reconciler.
    assert model(kubectl, namespace, "tiny")["status"]["decode"]["desiredReplicas"] == 9
    if "kvrelay_operator.autoscaler.kopf_timer" in sys.modules:
        # kopf holds models with a timer by a finalizer named after us, and lets go on delete.
        assert "kvrelay.dev/operator" in model(kubectl, namespace, "tiny")["metadata"]["finalizers"]
    kubectl("delete", "dm", "tiny", "-n", namespace, "--wait=true", "--timeout=30s", check=True)
    assert kubectl("get", "dm", "tiny", "-n", namespace).returncode != 0


def test_child_refused_by_the_api_server_is_reported_not_retried(kubectl, namespace, start_operator) -> None:
    bad = json.loads(json.dumps(TINY))
    bad["metadata"]["name"] = "bad"
    # spec.<role>.affinity is core/v1 Affinity, kept opaque by the CRD: core/v1 refuses an empty term list.
    required = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
    bad["spec"]["prefill"]["affinity"] = {"nodeAffinity": required}
    with start_operator() as runner:
        kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(bad), check=True)

        def degraded() -> dict[str, Any] | None:
            conditions = model(kubectl, namespace, "bad").get("status", {}).get("conditions", [])
            return next((c for c in conditions if c["type"] == "Degraded" and c["status"] == "True"), None)

        condition = wait_for(degraded, timeout=30, what="Degraded=True")
        assert condition["reason"] == "ApplyRefused" and "nodeSelectorTerms" in condition["message"]
        # kopf posts events from a queue of its own: the event may trail the status a little.
        selector = ("--field-selector", "reason=ApplyRefused")
        events = wait_for(lambda: get_json(kubectl, "events", "-n", namespace, *selector)["items"],
                          timeout=15, what="an ApplyRefused event")  # fmt: skip
        assert len(events) == 1 and events[0]["involvedObject"]["name"] == "bad"
        assert model(kubectl, namespace, "bad")["status"]["phase"] == "Degraded"
    assert "failed permanently" in runner.output  # kopf stops retrying a spec that can never apply


def test_quota_refusal_shows_in_status_and_an_event_and_clears(kubectl, namespace, operator) -> None:
    """A failure only the controllers meet (the quota admission refusing a pod) reaches the model."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "two-pods"},
             "spec": {"hard": {"pods": "2"}}}  # fmt: skip
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(quota), check=True)

    # The quota admission refuses every pod until the quota controller has computed its usage.
    def used() -> Any:
        return get_json(kubectl, "resourcequota", "two-pods", "-n", namespace).get("status", {}).get("used")

    wait_for(used, timeout=30, what="quota usage computed")
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TINY), check=True)  # 3 pods

    def condition(type_: str) -> dict[str, Any]:
        conditions = model(kubectl, namespace, "tiny").get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == type_), {})

    degraded = wait_for(lambda: condition("Degraded").get("status") == "True" and condition("Degraded"),
                        timeout=60, what="Degraded=True")  # fmt: skip
    assert degraded["reason"] == "ChildFailing"
    assert "exceeded quota: two-pods" in degraded["message"]  # the API server's own words
    selector = ("--field-selector", "involvedObject.name=tiny,reason=ChildFailing")
    events = wait_for(lambda: get_json(kubectl, "events", "-n", namespace, *selector)["items"], timeout=15,
                      what="a ChildFailing event")  # fmt: skip
    assert events[0]["type"] == "Warning" and "exceeded quota" in events[0]["message"]
    assert model(kubectl, namespace, "tiny")["status"]["phase"] == "Degraded"

    kubectl("delete", "resourcequota", "two-pods", "-n", namespace, check=True)
    wait_for(lambda: condition("Degraded").get("status") == "False", timeout=120, what="Degraded cleared")
    wait_for(lambda: condition("Ready").get("status") == "True", timeout=60, what="Ready")
    recovered = ("--field-selector", "involvedObject.name=tiny,reason=AsExpected")
    wait_for(lambda: get_json(kubectl, "events", "-n", namespace, *recovered)["items"], timeout=15,
             what="a Normal event saying it recovered")  # fmt: skip
