"""spec.networkPolicy on a real API server: each model's NetworkPolicies select exactly its own pods.

This cluster has no CNI (kwok's pods have no network), so nothing here enforces a policy; a CNI
that implements NetworkPolicy (Calico, Cilium, ...) acts on exactly what is checked instead: the
policies the API server admitted, and which pods and namespaces their selectors match, evaluated
by the API server's own label selection (`kubectl get -l`) over pods the real controllers made.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from kvrelay_envtest import example, get_json, wait_for

pytestmark = pytest.mark.controlplane

TINY = yaml.safe_load(example("tiny.yaml"))
ROLES = ("prefill", "decode", "router")
OTHER_WORKER = {"prefill": "decode", "decode": "prefill"}
MONITORING = "monitoring"  # the namespace the default metricsFrom peer names


def model(name: str) -> str:
    """examples/tiny.yaml as a model of this name."""
    cr = copy.deepcopy(TINY)
    cr["metadata"]["name"] = name
    return json.dumps(cr)


def label_selector(selector: dict[str, Any]) -> str:
    """A LabelSelector as kubectl's -l syntax (the operator renders matchLabels only)."""
    assert set(selector) <= {"matchLabels"}, selector
    return ",".join(f"{k}={v}" for k, v in selector.get("matchLabels", {}).items())


def selected(kubectl, kind: str, selector: dict[str, Any], *scope: str) -> set[str]:
    """Names the API server returns for `kubectl get <kind> -l <selector>`."""
    items = get_json(kubectl, kind, *scope, "-l", label_selector(selector))["items"]
    return {i["metadata"]["name"] for i in items}


def owned_pods(kubectl, namespace: str, deployment: str) -> set[str]:
    """Pods of a Deployment found through ownerReferences (Deployment -> ReplicaSet -> Pod), not labels."""

    def owned_by(item: dict[str, Any], kind: str, names: set[str]) -> bool:
        refs = item["metadata"].get("ownerReferences") or []
        return any(r["kind"] == kind and r["name"] in names for r in refs)

    sets = get_json(kubectl, "replicasets", "-n", namespace)["items"]
    ours = {rs["metadata"]["name"] for rs in sets if owned_by(rs, "Deployment", {deployment})}
    pods = get_json(kubectl, "pods", "-n", namespace)["items"]
    return {p["metadata"]["name"] for p in pods if owned_by(p, "ReplicaSet", ours)}


def policies(kubectl, namespace: str, instance: str) -> dict[str, dict[str, Any]]:
    """Role -> the live NetworkPolicy of one model."""
    items = get_json(
        kubectl, "networkpolicies", "-n", namespace, "-l", f"app.kubernetes.io/instance={instance}"
    )["items"]
    return {p["metadata"]["labels"]["kvrelay.dev/role"]: p for p in items}


def all_running(kubectl, namespace: str, instances: tuple[str, ...]) -> dict[tuple[str, str], set[str]]:
    """(model, role) -> its pods, once every role of every model has exactly its one pod Running."""
    pods = get_json(kubectl, "pods", "-n", namespace)["items"]
    running = {p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"}
    found = {(i, r): owned_pods(kubectl, namespace, f"{i}-{r}") for i in instances for r in ROLES}
    return found if all(len(p) == 1 and p <= running for p in found.values()) else {}


@pytest.fixture
def monitoring_namespace(kubectl) -> Any:
    """The namespace the default metricsFrom peer names, so that its selector has something to match."""
    created = kubectl("create", "namespace", MONITORING).returncode == 0
    yield MONITORING
    if created:
        kubectl("delete", "namespace", MONITORING, "--wait=false")


def test_policies_select_exactly_the_models_pods_and_their_peers(
    kubectl, namespace, operator, monitoring_namespace
) -> None:
    for name in ("tiny", "other"):
        kubectl("apply", "-n", namespace, "-f", "-", stdin=model(name), check=True)
    wait_for(lambda: len(policies(kubectl, namespace, "tiny")) == 3, timeout=30, what="tiny's policies")
    pods = wait_for(
        lambda: all_running(kubectl, namespace, ("tiny", "other")), timeout=90, what="pods Running"
    )
    others = set().union(*(p for (instance, _), p in pods.items() if instance == "other"))
    in_namespace = ("-n", namespace)

    for role, policy in policies(kubectl, namespace, "tiny").items():
        spec = policy["spec"]
        assert policy["metadata"]["ownerReferences"][0]["name"] == "tiny"
        assert spec["policyTypes"] == ["Ingress"], "egress is left open"
        # The policy applies to exactly the model's pods of its role; the other model's are untouched.
        assert selected(kubectl, "pods", spec["podSelector"], *in_namespace) == pods[("tiny", role)]
        (pod,) = (get_json(kubectl, "pod", name, *in_namespace) for name in pods[("tiny", role)])
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        if role == "router":
            (public,) = spec["ingress"]
            assert "from" not in public, "the public API is open to every source"
            assert public["ports"] == [{"protocol": "TCP", "port": ports["http"]}]
            continue
        grpc, kv, metrics = spec["ingress"]
        # gRPC from the model's own router pods only.
        (router,) = grpc["from"]
        assert selected(kubectl, "pods", router["podSelector"], *in_namespace) == pods[("tiny", "router")]
        assert grpc["ports"] == [{"protocol": "TCP", "port": ports["grpc"]}]
        # Every TCP port from the model's own pods of the other worker role (KV control port, UCX).
        (peer,) = kv["from"]
        peers = selected(kubectl, "pods", peer["podSelector"], *in_namespace)
        assert peers == pods[("tiny", OTHER_WORKER[role])] and not peers & others
        assert kv["ports"] == [{"protocol": "TCP"}] and "kv" in ports
        # The metrics port: the operator's pods and the monitoring namespace; no model pod here.
        assert metrics["ports"] == [{"protocol": "TCP", "port": ports["metrics"]}]
        operator_peer, monitoring = metrics["from"]
        assert not selected(kubectl, "pods", operator_peer["podSelector"], *in_namespace)
        assert selected(kubectl, "namespaces", monitoring["namespaceSelector"]) == {monitoring_namespace}
        assert "podSelector" not in monitoring, "every pod of the monitoring namespace"

    # Off: the operator deletes the policies (the garbage collector would only with the model);
    # the other model keeps its own. On again: back.
    def switch(enabled: bool) -> None:
        patch = json.dumps({"spec": {"networkPolicy": {"enabled": enabled}}})
        kubectl("patch", "dm", "tiny", "-n", namespace, "--type=merge", "-p", patch, check=True)

    switch(False)
    wait_for(lambda: not policies(kubectl, namespace, "tiny"), timeout=30, what="tiny's policies deleted")
    assert set(policies(kubectl, namespace, "other")) == set(ROLES)
    assert get_json(kubectl, "deployment", "tiny-decode", *in_namespace)["spec"]["replicas"] == 1
    switch(True)
    wait_for(lambda: len(policies(kubectl, namespace, "tiny")) == 3, timeout=30, what="tiny's policies back")


def test_policies_turned_off_while_the_operator_was_away_go_on_resume(
    kubectl, namespace, start_operator
) -> None:
    with start_operator():
        kubectl("apply", "-n", namespace, "-f", "-", stdin=model("tiny"), check=True)
        wait_for(lambda: len(policies(kubectl, namespace, "tiny")) == 3, timeout=30, what="policies")
    patch = json.dumps({"spec": {"networkPolicy": {"enabled": False}}})
    kubectl("patch", "dm", "tiny", "-n", namespace, "--type=merge", "-p", patch, check=True)
    with start_operator():
        # A fresh operator knows nothing it applied: it finds the live policies and deletes them.
        wait_for(lambda: not policies(kubectl, namespace, "tiny"), timeout=30, what="policies deleted")
    assert get_json(kubectl, "deployment", "tiny-decode", "-n", namespace)["spec"]["replicas"] == 1


def test_router_from_narrows_the_router_and_bad_peers_are_refused(kubectl, namespace, operator) -> None:
    cr = json.loads(model("narrow"))
    peers = [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
             {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]},
              "podSelector": {}}]  # fmt: skip
    cr["spec"]["networkPolicy"] = {"routerFrom": peers}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cr), check=True)
    router = wait_for(lambda: policies(kubectl, namespace, "narrow").get("router"), timeout=30, what="policy")
    (rule,) = router["spec"]["ingress"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING}}}
    assert rule["from"] == [*peers, monitoring], "the API server admitted the peers as rendered"
    for bad, message in (
        ({}, "a peer is an ipBlock, or a podSelector and/or a namespaceSelector"),
        ({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}, "a peer is an ipBlock"),
        ({"podSelector": {"matchExpressions": [{"key": "team", "operator": "In"}]}}, "need values"),
    ):
        cr["spec"]["networkPolicy"] = {"routerFrom": [bad]}
        refused = kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cr))
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
