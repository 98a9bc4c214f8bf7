"""Control-plane faults under a real `kvrelay-operator` process: kube-apiserver killed mid-reconcile,
kube-apiserver restarted while idle, etcd killed mid-reconcile. Each converges: every model has its
15 children exactly once, its status is current, an edit made afterwards is applied (the watches
came back), and the operator's log says what happened.

The module runs its own etcd + kube-apiserver (no controllers: nothing here needs pods) and restarts
them; the session's control plane, which the other modules share, is never touched.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from kvrelay_envtest import (
    REPO_ROOT,
    ControlPlane,
    control_plane,
    example,
    find_assets,
    find_kubectl,
    run_kubectl,
    wait_for,
)
from operator_process import OperatorProcess

pytestmark = pytest.mark.controlplane

TINY = yaml.safe_load(example("tiny.yaml"))
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/disaggregatedmodels.kvrelay.dev"
MODELS_PATH = "/apis/kvrelay.dev/v1alpha1/namespaces/{namespace}/disaggregatedmodels"
# Every kind a model's children come in (PodMonitor aside: its CRD is not installed; a tiny model has
# no model cache, so no Job or claim either), and ConfigMaps: any of those would be a child too many.
CHILD_COLLECTIONS = {
    "Deployment": "/apis/apps/v1/namespaces/{namespace}/deployments",
    "Service": "/api/v1/namespaces/{namespace}/services",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies",
    "ServiceAccount": "/api/v1/namespaces/{namespace}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
    "ConfigMap": "/api/v1/namespaces/{namespace}/configmaps",
    "Job": "/apis/batch/v1/namespaces/{namespace}/jobs",
    "PersistentVolumeClaim": "/api/v1/namespaces/{namespace}/persistentvolumeclaims",
}
CHILD_RESOURCES = {path.rsplit("/", 1)[1] for path in CHILD_COLLECTIONS.values()}
LABELS = "app.kubernetes.io/name=kvrelay"
# An operator that cannot renew its Lease within the renew deadline (2/3 of this) exits, by design.
# Longer than the chart's 15 s so that the deadline outlasts the longest outage here: a SIGTERMed
# kube-apiserver holds its watch connections open until the harness's 10 s grace ends, then takes a
# few seconds to start again on a loaded machine.
LEASE_SECONDS = 60
# Half kopf's default retry delay (60 s) of a handler that raised anything but kopf.TemporaryError:
# converging in time means the retry came from the operator's own, 5 s after a failed API call.
CONVERGE_S = 30.0


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    """This module's own etcd + kube-apiserver with the CRDs applied and established."""
    assets, reason = find_assets()
    if assets is None:
        pytest.skip(f"no control plane: {reason}")
    kubectl, reason = find_kubectl()
    if kubectl is None:
        pytest.skip(f"no kubectl: {reason}")
    with control_plane(assets) as cp:
        run_kubectl(kubectl, cp, "apply", "-f", str(REPO_ROOT / "crds"))

        def established() -> bool:
            conditions = cp.request("GET", CRD_PATH).get("status", {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for(established, timeout=30, what="the CRD Established")
        yield cp


class Operator:
    """A namespace-scoped `kvrelay-operator` process (Lease included) against `plane`."""

    def __init__(self, cp: ControlPlane, namespace: str, log: Path) -> None:
        self.cp = cp
        self.namespace = namespace
        with mock.patch.dict(os.environ, {"KUBECONFIG": str(cp.kubeconfig)}):
            self.process = OperatorProcess(namespace, log, lease_seconds=LEASE_SECONDS)
        wait_for(self.process.live, timeout=60, what="the operator running kopf")

    def log(self) -> str:
        return self.process.log.read_text(errors="replace")

    def alive(self) -> None:
        """Asserts the process has not exited (it never does on its own in these tests)."""
        code = self.process.proc.poll()
        assert code is None, f"the operator exited with {code}; log tail:\n{self.log()[-4000:]}"


@pytest.fixture
def operator(plane: ControlPlane, tmp_path: Path) -> Iterator[Operator]:
    """A fresh namespace and an operator process watching it; the log is shown if the test fails."""
    namespace = f"f-{uuid.uuid4().hex[:8]}"
    plane.request("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    op = Operator(plane, namespace, tmp_path / "operator.log")
    try:
        yield op
    finally:
        op.process.stop()


def _model(name: str) -> dict[str, Any]:
    body = copy.deepcopy(TINY)
    body["metadata"]["name"] = name
    return body


def _create(op: Operator, names: list[str]) -> None:
    for name in names:
        op.cp.request("POST", MODELS_PATH.format(namespace=op.namespace), _model(name))


def _get_model(op: Operator, name: str) -> dict[str, Any]:
    return op.cp.request("GET", f"{MODELS_PATH.format(namespace=op.namespace)}/{name}")


def _children(op: Operator) -> dict[str, list[dict[str, Any]]]:
    """Model name -> every object in the namespace labelled as one of its children (all kinds)."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for kind, path in CHILD_COLLECTIONS.items():
        items = op.cp.request("GET", f"{path.format(namespace=op.namespace)}?labelSelector={LABELS}")["items"]
        for item in items:
            instance = item["metadata"]["labels"].get("app.kubernetes.io/instance", "")
            by_model.setdefault(instance, []).append({**item, "kind": kind})
    return by_model


def _names(children: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((child["kind"], child["metadata"]["name"]) for child in children)


def _expected_children(name: str) -> list[tuple[str, str]]:
    """The 15 children of a tiny model: per role a Deployment, Service, PDB and NetworkPolicy, and
    the router's ServiceAccount, Role and RoleBinding."""
    per_role = [(kind, f"{name}-{role}") for role in ("prefill", "decode", "router")
                for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy")]  # fmt: skip
    router = [(kind, f"{name}-router") for kind in ("ServiceAccount", "Role", "RoleBinding")]
    return sorted(per_role + router)


def _current(op: Operator, name: str) -> dict[str, Any] | None:
    """The model if its status describes its current spec and all three Deployments, else None."""
    model = _get_model(op, name)
    status, spec = model.get("status") or {}, model["spec"]
    generation = model["metadata"]["generation"]
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {})
    current = (
        status.get("observedGeneration") == generation
        and all(c.get("observedGeneration") == generation for c in conditions.values())
        # No pods without controllers: waiting for replicas, but every Deployment known (not "missing").
        and status.get("phase") == "Progressing"
        and ready.get("reason") == "WaitingForReplicas"
        and "missing" not in ready.get("message", "")
        and conditions.get("Degraded", {}).get("status") == "False"
        and all((status.get(role) or {}).get("desiredReplicas") == spec[role]["replicas"]
                for role in ("prefill", "decode"))
    )  # fmt: skip
    return model if current else None


def _assert_converged(op: Operator, names: list[str]) -> None:
    """Each model's status current, and its children exactly the 15 expected, each once, each
    controlled by that model; nothing labelled as a child of a model that does not exist."""
    expected = {name: _expected_children(name) for name in names}

    def converged() -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]] | None:
        models = {name: _current(op, name) for name in names}
        children = _children(op)
        if any(model is None for model in models.values()):
            return None
        return (models, children) if {n: _names(children.get(n, [])) for n in names} == expected else None

    try:
        models, children = wait_for(converged, timeout=CONVERGE_S, interval=0.5, what="convergence")
    except TimeoutError:
        found = {name: _names(items) for name, items in _children(op).items()}
        statuses = {name: _get_model(op, name).get("status") for name in names}
        raise AssertionError(
            f"not converged:\nchildren {found}\nexpected {expected}\nstatuses {statuses}\n"
            f"operator log tail:\n{op.log()[-4000:]}"
        ) from None
    existing = {
        m["metadata"]["name"]
        for m in op.cp.request("GET", MODELS_PATH.format(namespace=op.namespace))["items"]
    }
    assert set(children) <= existing, f"children of no model: {set(children) - existing}"
    for name, model in models.items():
        for child in children[name]:
            owners = [
                ref["uid"] for ref in child["metadata"].get("ownerReferences") or [] if ref.get("controller")
            ]
            assert owners == [model["metadata"]["uid"]], (child["kind"], child["metadata"]["name"], owners)


def _child_writes(
    cp: ControlPlane, namespace: str, since: int, after: datetime.datetime | None = None
) -> int:
    """How many writes to children in `namespace` the API server answered with success after byte
    `since` of its audit log (and, with `after`, completed after that time)."""
    events, _ = cp.writes(since)
    return sum(
        1
        for e in events
        if e["objectRef"].get("namespace") == namespace
        and e["objectRef"].get("resource") in CHILD_RESOURCES
        and 200 <= e.get("responseStatus", {}).get("code", 0) < 300
        and (after is None or datetime.datetime.fromisoformat(e["stageTimestamp"]) > after)
    )


def _kill_at_first_child_write(
    op: Operator, names: list[str], restart: Callable[[], float]
) -> tuple[int, datetime.datetime]:
    """Creates the models and runs `restart` (a kill) as soon as the audit log shows the operator's
    first child write; returns the audit log offset from before the creates and a time at which the
    killed component was certainly down (a second after the kill)."""
    _, since = op.cp.writes()
    _create(op, names)
    wait_for(lambda: _child_writes(op.cp, op.namespace, since), timeout=30, interval=0.01,
             what="the operator's first child write")  # fmt: skip
    down = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
    started = time.monotonic()
    serving_after = restart()
    print(f"back {time.monotonic() - started:.1f}s after the kill ({serving_after:.1f}s after the start)")
    return since, down


def _edit_decode_replicas(op: Operator, name: str, replicas: int) -> None:
    """A spec edit (decode replicas) made once the control plane is back: the operator applies it."""
    path = f"{MODELS_PATH.format(namespace=op.namespace)}/{name}"
    patch = {"spec": {"decode": {"replicas": replicas}}}
    generation = op.cp.request("PATCH", path, patch, content_type="application/merge-patch+json")["metadata"][
        "generation"
    ]
    deployment = f"/apis/apps/v1/namespaces/{op.namespace}/deployments/{name}-decode"
    wait_for(lambda: op.cp.request("GET", deployment)["spec"]["replicas"] == replicas, timeout=CONVERGE_S,
             what=f"{name}-decode scaled to {replicas}")  # fmt: skip
    _assert_converged(op, [name])
    assert _get_model(op, name)["status"]["observedGeneration"] == generation
    assert f"{op.namespace}/{name} generation {generation} (update): applied 1 of 15" in op.log()


def _assert_after(log: str, first: str, then: str) -> None:
    """`first` is in the log, and `then` comes after its last occurrence."""
    matches = list(re.finditer(first, log))
    assert matches, f"{first!r} not in the operator's log:\n{log[-4000:]}"
    assert re.search(then, log[matches[-1].end() :]), (
        f"no {then!r} after the last {first!r} in:\n{log[-4000:]}"
    )


def _logged_after(log: str, pattern: str, after: datetime.datetime) -> list[str]:
    """Lines of the log (its timestamps in local time, as logging writes them) matching `pattern`,
    logged after `after`."""
    lines = []
    for line in log.splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if stamp and re.search(pattern, line):
            logged = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone()
            if logged > after:
                lines.append(line)
    return lines


def _assert_quiet(log: str) -> None:
    """No handler raised anything but kopf.TemporaryError: no traceback, no 60 s default retry."""
    assert "Traceback" not in log and "will try again in 60 seconds" not in log, log[-4000:]


def test_apiserver_killed_mid_reconcile_converges(plane: ControlPlane, operator: Operator) -> None:
    names = [f"m{i}" for i in range(5)]
    since, down = _kill_at_first_child_write(operator, names, lambda: plane.restart_apiserver(2.0, kill=True))
    _assert_converged(operator, names)
    operator.alive()
    assert _child_writes(plane, operator.namespace, since, after=down), "no child written after the restart"
    log = operator.log()
    # The kill cut reconciles short; kopf retried them (in 5 s, not its default 60 s) and the last of
    # those failures was followed by a successful reconcile.
    failed = (
        r"Handler 'reconcile' failed temporarily: "
        r"(applying children|writing status) failed: 0 API server unreachable"
    )
    _assert_after(log, failed, rf"{operator.namespace}/m\d generation 1 \(create\): applied \d+ of 15")
    for name in names:
        assert f"{operator.namespace}/{name} generation 1 (create): applied" in log, name
    # The Lease could not be renewed while the API server was gone; it was afterwards, in time.
    _assert_after(
        log, "cannot reach the API server to (read|renew) the Lease", "the API server answers again"
    )
    _assert_quiet(log)
    _edit_decode_replicas(operator, "m0", 2)


def test_apiserver_restarted_while_idle_then_edit_applies(plane: ControlPlane, operator: Operator) -> None:
    _create(operator, ["idle"])
    _assert_converged(operator, ["idle"])
    before = len(operator.log())
    plane.restart_apiserver(2.0)  # SIGTERM, as a rolling restart of the control plane does
    operator.alive()
    # Only now can the model be edited: the operator sees the edit through a watch it re-established.
    _edit_decode_replicas(operator, "idle", 2)
    log = operator.log()[before:]
    watch_failed = r"Request attempt #\d+/\d+ failed; will retry: GET \S+/disaggregatedmodels\?watch=true"
    _assert_after(log, watch_failed, r"idle generation 2 \(update\): applied 1 of 15 children")
    _assert_after(
        log, "cannot reach the API server to (read|renew) the Lease", "the API server answers again"
    )
    _assert_quiet(log)


def test_etcd_killed_mid_reconcile_converges(plane: ControlPlane, operator: Operator) -> None:
    names = [f"e{i}" for i in range(5)]
    since, down = _kill_at_first_child_write(operator, names, lambda: plane.restart_etcd(3.0, kill=True))
    _assert_converged(operator, names)
    operator.alive()
    # The API server stayed up and held the operator's requests until etcd was back (one in flight
    # at the kill may fail and be retried): the reconciles were finished after the restart, and
    # logged so, with nothing else to say.
    assert _child_writes(plane, operator.namespace, since, after=down), "no child written after the restart"
    log = operator.log()
    for name in names:
        assert f"{operator.namespace}/{name} generation 1 (create): applied" in log, name
    assert _logged_after(log, r"generation 1 \(create\): applied \d+ of 15", down), log[-4000:]
    _assert_quiet(log)
    _edit_decode_replicas(operator, "e0", 3)
