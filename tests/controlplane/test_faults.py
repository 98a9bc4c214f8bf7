"""Faults on the real control plane: the operator killed mid-reconcile, another field manager taking
`spec.replicas`, the namespace deleted under a live model, and a CRD newer than the operator. Each
converges: no duplicate children, no lost status, and the operator says what happened."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvrelay_envtest import REPO_ROOT, example, get_json, wait_for
from operator_process import OperatorProcess

pytestmark = pytest.mark.controlplane

TINY = yaml.safe_load(example("tiny.yaml"))
CHILD_KINDS = (
    "configmaps,services,deployments,poddisruptionbudgets,serviceaccounts,roles,rolebindings,networkpolicies"
)
LABELS = "app.kubernetes.io/name=kvrelay"


def _children(kubectl, namespace: str, instance: str) -> list[dict[str, Any]]:
    items = get_json(
        kubectl, CHILD_KINDS, "-n", namespace, "-l", f"{LABELS},app.kubernetes.io/instance={instance}"
    )
    return items["items"]


def _condition(kubectl, namespace: str, name: str, type_: str) -> dict[str, Any]:
    result = kubectl("get", "dm", name, "-n", namespace, "-o", "json")
    conditions = (
        json.loads(result.stdout).get("status", {}).get("conditions", []) if result.returncode == 0 else []
    )
    return next((c for c in conditions if c["type"] == type_), {})


def test_operator_killed_mid_reconcile_converges_on_restart(kubectl, kube, namespace, tmp_path: Path) -> None:
    first = OperatorProcess(namespace, tmp_path / "first.log")
    try:
        wait_for(first.live, timeout=60, what="the first operator running kopf")
        kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TINY), check=True)
        # SIGKILL as soon as the first child exists: the reconcile is applying the others.
        wait_for(lambda: _children(kubectl, namespace, "tiny"), timeout=30, interval=0.02, what="a child")
        first.proc.kill()
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    partial = {(c["kind"], c["metadata"]["name"]) for c in _children(kubectl, namespace, "tiny")}
    second = OperatorProcess(namespace, tmp_path / "second.log")
    try:
        wait_for(lambda: _condition(kubectl, namespace, "tiny", "Ready").get("status") == "True", timeout=90,
                 what="Ready after the restart")  # fmt: skip
        children = _children(kubectl, namespace, "tiny")
        names = [(c["kind"], c["metadata"]["name"]) for c in children]
        assert len(names) == len(set(names)), "duplicate children"
        assert partial <= set(names)
        kinds = sorted(kind for kind, _ in names)
        assert kinds.count("Deployment") == 3 and kinds.count("Service") == 3, kinds
        assert kinds.count("NetworkPolicy") == 3, kinds
        replica_sets = get_json(
            kubectl, "replicasets", "-n", namespace, "-l", "app.kubernetes.io/instance=tiny"
        )
        assert len(replica_sets["items"]) == 3, "one ReplicaSet per Deployment: no rollout from the restart"
        status = kube.get_model(namespace, "tiny")["status"]
        assert status["observedGeneration"] == 1 and status["phase"] == "Ready"
        log = second.log.read_text(errors="replace")
        assert "tiny" in log and "Traceback" not in log, log[-3000:]
    finally:
        second.stop()


def test_another_field_manager_taking_replicas_is_put_back(kubectl, namespace, operator) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TINY), check=True)
    wait_for(lambda: _condition(kubectl, namespace, "tiny", "Ready").get("status") == "True", timeout=60,
             what="Ready")  # fmt: skip
    # A GitOps tool's server-side apply that forces ownership of spec.replicas.
    intruder = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "tiny-decode"},
                "spec": {"replicas": 4}}  # fmt: skip
    forced = ("--server-side", "--force-conflicts", "--field-manager=gitops")
    kubectl("apply", "-n", namespace, *forced, "-f", "-", stdin=json.dumps(intruder), check=True)

    def replicas_and_owner() -> tuple[int, set[str]]:
        body = get_json(kubectl, "deployment", "tiny-decode", "-n", namespace, "--show-managed-fields")
        owners = {
            m["manager"]
            for m in body["metadata"].get("managedFields", [])
            if "f:replicas" in (m.get("fieldsV1", {}).get("f:spec") or {})
        }
        return body["spec"]["replicas"], owners

    wait_for(lambda: replicas_and_owner()[0] == 1, timeout=30, what="replicas put back to 1")
    _, owners = replicas_and_owner()
    assert "gitops" not in owners, owners  # the operator's forced apply took the field back
    events = wait_for(
        lambda: get_json(kubectl, "events", "-n", namespace, "--field-selector",
                         "involvedObject.name=tiny,reason=ReplicasRestored")["items"],
        timeout=15, what="a ReplicasRestored event",
    )  # fmt: skip
    assert "scaled to 4" in events[0]["message"]
    drift = wait_for(lambda: _condition(kubectl, namespace, "tiny", "DriftCorrected"), timeout=15,
                     what="DriftCorrected")  # fmt: skip
    assert drift["status"] == "True"


def test_namespace_deleted_under_a_live_model(kubectl, crds) -> None:
    """The namespace goes with a model whose autoscaler timer holds a finalizer: the operator lets go.

    Cluster-wide, as the chart runs it by default. An operator limited to a list of namespaces
    (`watchNamespaces`) does not: kopf stops watching a namespace once it is terminating, so the
    finalizer stays (noted in the chart README)."""
    name = f"gone-{int(time.time() * 1000) % 10**8}"
    kubectl("create", "namespace", name, check=True)
    auto = json.loads(json.dumps(TINY))
    auto["spec"]["autoscaling"] = {
        "mode": "auto",
        "intervalSeconds": 3600,
        "prometheusUrl": "http://127.0.0.1:9",
    }
    from kopf.testing import KopfRunner
    from kvrelay_operator.main import HANDLER_MODULES

    modules = [arg for module in HANDLER_MODULES for arg in ("-m", module)]
    with KopfRunner(["run", "--standalone", "--all-namespaces", *modules], timeout=60) as runner:
        kubectl("apply", "-n", name, "-f", "-", stdin=json.dumps(auto), check=True)
        wait_for(
            lambda: get_json(kubectl, "deployment", "tiny-decode", "-n", name), timeout=30, what="children"
        )
        kubectl("delete", "namespace", name, "--wait=false", check=True)
        wait_for(lambda: kubectl("get", "namespace", name).returncode != 0, timeout=90,
                 what="the namespace gone (finalizers released)")  # fmt: skip
    assert runner.exception is None and runner.exit_code == 0
    assert "failed with an exception" not in runner.output, runner.output[-3000:]


def test_crd_newer_than_the_operator_is_reported_not_crashed_on(
    kubectl, namespace, start_operator, crds
) -> None:
    """A CRD upgraded before the operator: a model using the new field is accepted by the API server,
    and the operator says it cannot read it (condition and Event) while the other models go on.

    The operator starts after the upgrade: a watch opened before it is served through the old
    schema, which prunes the new field from the events it still delivers."""
    path = REPO_ROOT / "crds" / "kvrelay.dev_disaggregatedmodels.yaml"
    newer = yaml.safe_load(path.read_text())
    spec_schema = newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["properties"]["futureField"] = {"type": "string", "description": "added by a later release"}
    future = json.loads(json.dumps(TINY))
    future["metadata"]["name"] = "future"
    future["spec"]["futureField"] = "x"
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(TINY), check=True)  # an existing model
    try:
        kubectl("apply", "-f", "-", stdin=json.dumps(newer), check=True)

        def serving_new_schema() -> bool:  # a moment after the apply
            cr = json.dumps(future)
            return kubectl("apply", "-n", namespace, "--dry-run=server", "--validate=strict", "-f", "-",
                           stdin=cr).returncode == 0  # fmt: skip

        wait_for(serving_new_schema, timeout=30, what="the new field accepted")
        with start_operator():
            wait_for(lambda: _condition(kubectl, namespace, "tiny", "Ready").get("status") == "True",
                     timeout=60, what="the existing model Ready")  # fmt: skip
            kubectl(
                "apply", "-n", namespace, "--validate=strict", "-f", "-", stdin=json.dumps(future), check=True
            )

            def degraded_future() -> dict[str, Any]:
                condition = _condition(kubectl, namespace, "future", "Degraded")
                return condition if condition.get("status") == "True" else {}

            degraded = wait_for(degraded_future, timeout=30, what="Degraded on the unreadable model")
            assert degraded["reason"] == "SpecNotUnderstood" and "futureField" in degraded["message"]
            assert "upgrade the operator" in degraded["message"]
            selector = ("--field-selector", "involvedObject.name=future,reason=SpecNotUnderstood")
            wait_for(lambda: get_json(kubectl, "events", "-n", namespace, *selector)["items"], timeout=15,
                     what="a SpecNotUnderstood event")  # fmt: skip
            assert not _children(kubectl, namespace, "future")  # nothing half-rendered
            # The existing model is still handled: an edit to it applies.
            edit = '{"spec":{"decode":{"replicas":1,"maxReplicas":3,"minReplicas":1}}}'
            kubectl("patch", "dm", "tiny", "-n", namespace, "--type=merge", "-p", edit, check=True)

            def generation_seen() -> bool:
                status = get_json(kubectl, "dm", "tiny", "-n", namespace).get("status") or {}
                return status.get("observedGeneration") == 2

            wait_for(generation_seen, timeout=30, what="the existing model reconciled")
            assert _condition(kubectl, namespace, "tiny", "Degraded").get("status") == "False"
            kubectl("delete", "dm", "future", "-n", namespace, "--wait=true", "--timeout=30s", check=True)
    finally:
        kubectl("apply", "-f", str(path), check=True)  # the suite's CRD again
