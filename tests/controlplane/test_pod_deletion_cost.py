"""Scale-down picks its victims, on a real API server.

1. The chart's grant: the operator's ServiceAccount (its own token) may patch a pod's
   `controller.kubernetes.io/pod-deletion-cost` and nothing else; the chart's
   ValidatingAdmissionPolicy refuses every other change, while the admin can still make them.
2. The wiring: the in-process operator lowers a pool to the autoscaler's desiredReplicas after
   marking the pool's pods, and the real ReplicaSet controller removes the least-loaded pod. kwok's
   pods have no /metrics, so the loads are served by this test through the reader's URL template
   (KVRELAY_POD_METRICS_URL); the ordering, the annotations and the controller's choice are real.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kvrelay_envtest import cluster_tools_or_skip, control_plane, example, find_kubectl, get_json, wait_for
from kvrelay_operator.kube import KubeClient
from kvrelay_operator.victims import DELETION_COST
from prometheus_client import REGISTRY
from test_helm_install import Cluster, _write_sa_kubeconfig

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvrelay"
RELEASE, RELEASE_NS, MODEL_NS, SA = "kvrelay", "kvrelay-system", "models", "kvrelay-operator"
POD = "worker-0"
POLICY = f"{SA}-pod-deletion-cost"
REFUSAL = "may change only the controller.kubernetes.io/pod-deletion-cost annotation"


def _bare_pod() -> dict[str, Any]:
    # No scheduler runs on this control plane: the pod stays Pending, which is all a patch needs.
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD, "namespace": MODEL_NS,
            "labels": {"app.kubernetes.io/name": "kvrelay", "kvrelay.dev/role": "decode"},
            "annotations": {"team": "inference"},
        },
        "spec": {"containers": [{"name": "worker", "image": "ghcr.io/kvrelay/kvrelay-worker:0.1.0"}]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def policy_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane of its own with the chart installed (defaults: the policy is on) and one pod."""
    assets, kubectl, helm = cluster_tools_or_skip()
    with control_plane(assets) as plane:
        cluster = Cluster(plane, kubectl, helm, tmp_path_factory.mktemp("sa") / "kubeconfig")
        cmd = [str(helm), "install", RELEASE, str(CHART), f"--kubeconfig={plane.kubeconfig}"]
        cmd += ["--namespace", RELEASE_NS, "--create-namespace", "--timeout=120s"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr + done.stdout
        _write_sa_kubeconfig(cluster, SA, RELEASE_NS, cluster.sa_kubeconfig)
        cluster.admin("create", "namespace", MODEL_NS)
        cluster.admin("create", "-f", "-", stdin=json.dumps(_bare_pod()))
        _wait_enforced(cluster)
        yield cluster


def _wait_enforced(cluster: Cluster) -> None:
    """Until the API server enforces the new policy (it loads policies asynchronously); probed with
    a server-side dry run, so the pod itself never changes."""
    patch = json.dumps({"metadata": {"labels": {"probe": "x"}}})
    deadline = time.monotonic() + 30
    while True:
        done = cluster.as_operator("patch", "pod", POD, "-n", MODEL_NS, "--type=merge", "-p", patch,
                                   "--dry-run=server", check=False)  # fmt: skip
        if done.returncode != 0 and REFUSAL in done.stderr:
            return
        assert time.monotonic() < deadline, f"policy not enforced after 30s: {done.stderr}{done.stdout}"
        time.sleep(0.5)


def get_policy(cluster: Cluster) -> dict[str, Any]:
    return json.loads(cluster.admin("get", "validatingadmissionpolicy", POLICY, "-o", "json").stdout)


def _pod(cluster: Cluster) -> dict[str, Any]:
    return json.loads(cluster.admin("get", "pod", POD, "-n", MODEL_NS, "-o", "json").stdout)


def test_policy_binds_to_the_operator_only(policy_cluster: Cluster) -> None:
    policy = get_policy(policy_cluster)
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert f"system:serviceaccount:{RELEASE_NS}:{SA}" in condition
    binding = json.loads(
        policy_cluster.admin("get", "validatingadmissionpolicybinding", POLICY, "-o", "json").stdout
    )
    assert binding["spec"] == {"policyName": POLICY, "validationActions": ["Deny"]}
    can_i = policy_cluster.as_operator("auth", "can-i", "patch", "pods", "-n", MODEL_NS, check=False)
    assert can_i.stdout.strip() == "yes"


def test_operator_may_set_the_deletion_cost(policy_cluster: Cluster) -> None:
    patch = json.dumps({"metadata": {"annotations": {DELETION_COST: "5"}}})
    policy_cluster.as_operator("patch", "pod", POD, "-n", MODEL_NS, "--type=merge", "-p", patch)
    assert _pod(policy_cluster)["metadata"]["annotations"] == {"team": "inference", DELETION_COST: "5"}
    # The operator's own client, with the ServiceAccount's token, changes it again.
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(policy_cluster.sa_kubeconfig), client_configuration=configuration)
    configuration.verify_ssl, configuration.ssl_ca_cert = True, str(policy_cluster.plane.ca_file)
    kube = KubeClient(client.ApiClient(configuration))
    kube.annotate_pod(MODEL_NS, POD, {DELETION_COST: "-3"})
    assert _pod(policy_cluster)["metadata"]["annotations"][DELETION_COST] == "-3"
    # Removing it (a merge patch with null) is a change of that annotation too.
    remove = json.dumps({"metadata": {"annotations": {DELETION_COST: None}}})
    policy_cluster.as_operator("patch", "pod", POD, "-n", MODEL_NS, "--type=merge", "-p", remove)
    assert DELETION_COST not in _pod(policy_cluster)["metadata"]["annotations"]


# (what, patch type, patch, the policy's message) the operator must be refused.
REFUSED = [
    ("image", "json", [{"op": "replace", "path": "/spec/containers/0/image", "value": "evil:latest"}],
     "not its spec"),
    ("new label", "merge", {"metadata": {"labels": {"owned": "yes"}}}, "not its spec, status, labels"),
    ("changed label", "merge", {"metadata": {"labels": {"kvrelay.dev/role": "prefill"}}}, "labels"),
    ("removed label", "json", [{"op": "remove", "path": "/metadata/labels/kvrelay.dev~1role"}], "labels"),
    ("new annotation", "merge", {"metadata": {"annotations": {"other": "x"}}}, "no other annotation"),
    ("changed annotation", "merge", {"metadata": {"annotations": {"team": "evil"}}}, "no other annotation"),
    ("removed annotation", "merge", {"metadata": {"annotations": {"team": None}}}, "no other annotation"),
    ("cost and a label", "merge", {"metadata": {"labels": {"x": "y"}, "annotations": {DELETION_COST: "1"}}},
     "labels"),
    ("finalizer", "merge", {"metadata": {"finalizers": ["example.com/hold"]}}, "finalizers"),
    ("owner", "merge", {"metadata": {"ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "00000000-0000-0000-0000-000000000001"}
    ]}}, "owners"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("patch_type", "patch", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_operator_is_refused_any_other_change(
    policy_cluster: Cluster, patch_type: str, patch: Any, message: str
) -> None:
    before = _pod(policy_cluster)
    done = policy_cluster.as_operator("patch", "pod", POD, "-n", MODEL_NS, f"--type={patch_type}",
                                      "-p", json.dumps(patch), check=False)  # fmt: skip
    assert done.returncode != 0, f"the operator changed the pod: {done.stdout}"
    assert f"ValidatingAdmissionPolicy '{POLICY}'" in done.stderr and message in done.stderr, done.stderr
    after = _pod(policy_cluster)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_admin_may_still_change_anything(policy_cluster: Cluster) -> None:
    json_patch = [{"op": "replace", "path": "/spec/containers/0/image", "value": "kvrelay/kvrelay:dev"}]
    policy_cluster.admin("patch", "pod", POD, "-n", MODEL_NS, "--type=json", "-p", json.dumps(json_patch))
    merge = {"metadata": {"labels": {"owned": "yes"}, "annotations": {"team": "platform", "other": "x"}}}
    policy_cluster.admin("patch", "pod", POD, "-n", MODEL_NS, "--type=merge", "-p", json.dumps(merge))
    pod = _pod(policy_cluster)
    assert pod["spec"]["containers"][0]["image"] == "kvrelay/kvrelay:dev"
    assert pod["metadata"]["labels"]["owned"] == "yes"
    assert pod["metadata"]["annotations"] == {"team": "platform", "other": "x"}
    # Impersonating the operator with the admin's credentials is the operator again: refused.
    done = policy_cluster.admin("patch", "pod", POD, "-n", MODEL_NS, "--type=merge", "-p",
                                json.dumps({"metadata": {"labels": {"owned": "no"}}}),
                                f"--as=system:serviceaccount:{RELEASE_NS}:{SA}", check=False)  # fmt: skip
    assert done.returncode != 0 and REFUSAL in done.stderr, done.stderr


def test_policy_type_checks_cleanly(kubectl) -> None:
    """The type check against the Pod schema (a misspelt field, a wrong overload) is a status the
    controller manager writes, so it runs on the session cluster, which has one."""
    kubectl_path, _ = find_kubectl()
    assert kubectl_path is not None
    cmd = [str(kubectl_path.parent / "helm"), "template", "typecheck", str(CHART), "--namespace", RELEASE_NS]
    cmd += ["--show-only", "templates/pod-deletion-cost-policy.yaml"]
    rendered = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    kubectl("apply", "-f", "-", stdin=rendered, check=True)
    name = "typecheck-kvrelay-operator-pod-deletion-cost"
    try:

        def type_checked() -> dict[str, Any] | None:
            policy = get_json(kubectl, "validatingadmissionpolicy", name)
            checked = policy.get("status", {}).get("observedGeneration") == policy["metadata"]["generation"]
            return policy if checked else None

        policy = wait_for(type_checked, timeout=60, what="the policy's type check")
        warnings = (policy["status"].get("typeChecking") or {}).get("expressionWarnings")
        assert not warnings, warnings
    finally:
        kubectl("delete", "-f", "-", stdin=rendered)


# --- the wiring: the operator marks the pool, the ReplicaSet controller removes the cheapest pod ---


class _Loads(http.server.ThreadingHTTPServer):
    """Serves worker /metrics text per pod at /<namespace>/<pod>/metrics; a pod not in `text` is a 404."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LoadsHandler)
        self.text: dict[str, str] = {}


class _LoadsHandler(http.server.BaseHTTPRequestHandler):
    server: _Loads

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")  # namespace, pod, "metrics"
        body = self.server.text.get(parts[1]) if len(parts) == 3 else None
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        if body is not None:
            self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


def worker_metrics(running: int, waiting: int, kv_usage: float) -> str:
    """What a decode worker's /metrics says about its load (names from kvrelay_worker/metrics.py)."""
    series = {"requests_running": running, "requests_waiting": waiting, "kv_cache_usage_ratio": kv_usage}
    labels = '{model="tiny",role="decode"}'
    return "".join(f"# TYPE kvrelay_{k} gauge\nkvrelay_{k}{labels} {v}\n" for k, v in series.items())


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Loads]:
    """The load source of the operator started after it (its URL template points here)."""
    server = _Loads()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    monkeypatch.setenv("KVRELAY_POD_METRICS_URL", f"http://127.0.0.1:{port}/{{namespace}}/{{pod}}/metrics")
    # This server shares the test process (and its GIL) with the operator, on a loaded 2-core CI
    # machine: the 1 s default read timeout could turn a slow answer into "load unknown" (cost 0).
    monkeypatch.setenv("KVRELAY_POD_METRICS_TIMEOUT_SECONDS", "10")
    yield server
    server.shutdown()


def _live_decode_pods(kubectl, namespace: str) -> dict[str, dict[str, Any]]:
    selector = "app.kubernetes.io/instance=tiny,kvrelay.dev/role=decode"
    items = get_json(kubectl, "pods", "-n", namespace, "-l", selector)["items"]
    return {p["metadata"]["name"]: p for p in items if not p["metadata"].get("deletionTimestamp")}


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return bool(pod["status"].get("podIP")) and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


def _apply_and_wait_for_3_decode_pods(
    kubectl, namespace: str, model: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Applies the model (decode replicas 3) and waits until its 3 decode pods are Ready (kwok runs them)."""
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(model), check=True)
    return wait_for(
        lambda: (p := _live_decode_pods(kubectl, namespace)) and len(p) == 3
        and all(map(_ready, p.values())) and p,
        timeout=60, what="3 Ready decode pods",
    )  # fmt: skip


def _scaled_messages(kubectl, namespace: str) -> list[str]:
    selector = ("--field-selector", "reason=Scaled")
    return [e["message"] for e in get_json(kubectl, "events", "-n", namespace, *selector)["items"]]


def _read_errors() -> float:
    labels = {"model": "tiny", "role": "decode", "step": "read"}
    return REGISTRY.get_sample_value("kvrelay_scale_down_victim_errors_total", labels) or 0.0


def test_scale_down_removes_the_least_loaded_pod(kubectl, kube, namespace, start_operator, loads) -> None:
    tiny = yaml.safe_load(example("tiny.yaml"))
    tiny["spec"]["autoscaling"] = {"mode": "auto", "intervalSeconds": 3600}
    tiny["spec"]["decode"].update(replicas=3, minReplicas=1, maxReplicas=4)
    with start_operator() as runner:
        pods = _apply_and_wait_for_3_decode_pods(kubectl, namespace, tiny)
        # The autoscaler's own first decision (a hold: no Prometheus here) must not race ours.
        wait_for(lambda: (get_json(kubectl, "dm", "tiny", "-n", namespace)["status"].get("autoscaler") or {})
                 .get("lastDecisionTime"), timeout=30, what="the autoscaler's first decision")  # fmt: skip
        busy, idle, mid = sorted(pods)
        loads.text = {
            busy: worker_metrics(running=6, waiting=2, kv_usage=0.8),
            idle: worker_metrics(running=1, waiting=0, kv_usage=0.1),
            mid: worker_metrics(running=3, waiting=0, kv_usage=0.3),
        }
        errors_before = _read_errors()
        kube.patch_status(namespace, "tiny", {"decode": {"desiredReplicas": 2}})
        left = wait_for(lambda: (p := _live_decode_pods(kubectl, namespace)) and len(p) == 2 and p,
                        timeout=30, what="decode scaled to 2")  # fmt: skip
        assert set(left) == {busy, mid}, (
            f"the ReplicaSet controller removed {set(pods) - set(left)}, not {idle}"
        )
        costs = {name: int(p["metadata"]["annotations"][DELETION_COST]) for name, p in left.items()}
        assert costs[busy] > costs[mid]
        # kopf posts events from a queue of its own: the event may trail the scale-down a little.
        named = f"least loaded first: {idle}"
        wait_for(lambda: any(named in m for m in _scaled_messages(kubectl, namespace)), timeout=15,
                 what=f"a Scaled event naming {idle}")  # fmt: skip
        assert _read_errors() == errors_before

        # The busy pod stops answering: unknown load is the lowest cost, so it goes before the idle one.
        del loads.text[busy]
        kube.patch_status(namespace, "tiny", {"decode": {"desiredReplicas": 1}})
        left = wait_for(lambda: (p := _live_decode_pods(kubectl, namespace)) and len(p) == 1 and p,
                        timeout=30, what="decode scaled to 1")  # fmt: skip
        assert set(left) == {mid}
        assert _read_errors() >= errors_before + 1  # counted, and the scale-down went ahead
        kubectl("delete", "dm", "tiny", "-n", namespace, "--wait=true", "--timeout=30s", check=True)
    assert f"load of pod {busy} unknown" in runner.output


def test_spec_scale_down_removes_the_least_loaded_pod(kubectl, namespace, start_operator, loads) -> None:
    """Lowering spec.decode.replicas by hand (autoscaling off) marks the victims the same way."""
    tiny = yaml.safe_load(example("tiny.yaml"))
    tiny["spec"]["decode"].update(replicas=3)
    with start_operator():
        pods = _apply_and_wait_for_3_decode_pods(kubectl, namespace, tiny)
        busy, mid, idle = sorted(pods)
        loads.text = {
            busy: worker_metrics(running=4, waiting=0, kv_usage=0.5),
            mid: worker_metrics(running=2, waiting=0, kv_usage=0.5),
            idle: worker_metrics(running=0, waiting=0, kv_usage=0.0),
        }
        patch = {"spec": {"decode": {"replicas": 2}}}
        kubectl("patch", "dm", "tiny", "-n", namespace, "--type=merge", "-p", json.dumps(patch), check=True)
        costs: dict[str, str | None] = {}  # the last deletion cost seen on each pod, for a failure message

        def scaled_to_2() -> dict[str, dict[str, Any]] | None:
            live = _live_decode_pods(kubectl, namespace)
            costs.update(
                {n: (p["metadata"].get("annotations") or {}).get(DELETION_COST) for n, p in live.items()}
            )
            return live if len(live) == 2 else None

        left = wait_for(scaled_to_2, timeout=30, what="decode scaled to 2")
        # (Not runner.output here: it blocks until the operator has stopped. The operator's log is in
        # pytest's captured log of a failing test.)
        assert set(left) == {busy, mid}, f"removed {set(pods) - set(left)}, not {idle}; costs seen {costs}"
        wanted = f"decode scaled 3 -> 2 (spec.decode.replicas); least loaded first: {idle}"
        wait_for(lambda: wanted in _scaled_messages(kubectl, namespace), timeout=15, what=f"event {wanted!r}")
        kubectl("delete", "dm", "tiny", "-n", namespace, "--wait=true", "--timeout=30s", check=True)
