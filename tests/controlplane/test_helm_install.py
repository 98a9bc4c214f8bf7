"""`helm install` of the chart onto a real kube-apiserver, then the chart's ServiceAccount RBAC is proven.

The operator's writes are replayed as that ServiceAccount (a real token from the TokenRequest API):
every child ``resources.render_children`` renders for the example model is server-side applied with
the operator's field manager, and the model's status is patched. A verb the operator must not have
is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kvrelay_envtest import ControlPlane, cluster_tools_or_skip, control_plane, free_port
from kvrelay_operator import resources
from kvrelay_operator.api import DisaggregatedModelSpec, DisaggregatedModelStatus
from kvrelay_worker.processes import stop_process

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvrelay"
RELEASE, RELEASE_NS, MODEL_NS = "kvrelay", "kvrelay-system", "models"
SA = "kvrelay-operator"
SA_USER = f"system:serviceaccount:{RELEASE_NS}:{SA}"
FIELD_MANAGER = "kvrelay-operator"

# The Prometheus Operator's kinds, reduced to what the API server needs to store them: installing
# them makes the chart's capability-gated PodMonitor and PrometheusRule render and apply for real.
MONITORING_CRDS = [("PodMonitor", "podmonitors"), ("PrometheusRule", "prometheusrules")]


@dataclass
class Cluster:
    """A control plane of its own (the operator runs cluster-wide here) with the chart installed."""

    plane: ControlPlane
    kubectl: Path
    helm: Path
    sa_kubeconfig: Path

    def admin(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as the cluster admin."""
        return _run([str(self.kubectl), f"--kubeconfig={self.plane.kubeconfig}", *args], stdin, check)

    def as_operator(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """kubectl authenticated with the chart ServiceAccount's own token."""
        return _run([str(self.kubectl), f"--kubeconfig={self.sa_kubeconfig}", *args], stdin, check)


def _run(cmd: list[str], stdin: str | None, check: bool) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:4])}... failed ({done.returncode}):\n{done.stderr}{done.stdout}"
        )
    return done


def _monitoring_crd(kind: str, plural: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def helm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assets, kubectl, helm = cluster_tools_or_skip()
    with control_plane(assets) as plane:
        cluster = Cluster(plane, kubectl, helm, tmp_path_factory.mktemp("sa") / "kubeconfig")
        crds = "\n---\n".join(yaml.safe_dump(_monitoring_crd(k, p)) for k, p in MONITORING_CRDS)
        cluster.admin("apply", "-f", "-", stdin=crds)
        for _, plural in MONITORING_CRDS:
            cluster.admin(
                "wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com", "--timeout=60s"
            )
        _helm_install(cluster)
        _write_sa_kubeconfig(cluster, SA, RELEASE_NS, cluster.sa_kubeconfig)
        cluster.admin("create", "namespace", MODEL_NS)
        yield cluster


def _write_sa_kubeconfig(cluster: Cluster, account: str, namespace: str, path: Path) -> None:
    """A kubeconfig holding a real token of the ServiceAccount (TokenRequest API), not impersonation."""
    token = cluster.admin("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    server = {"server": cluster.plane.server, "insecure-skip-tls-verify": True}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))


def _helm_install(helm_cluster: Cluster) -> None:
    example = CHART / "examples" / "single-node-pool.yaml"
    cmd = [
        str(helm_cluster.helm),
        "install",
        RELEASE,
        str(CHART),
        f"--kubeconfig={helm_cluster.plane.kubeconfig}",
    ]
    cmd += ["--namespace", RELEASE_NS, "--create-namespace", "-f", str(example), "--timeout=120s"]
    # No kubelet runs here, so pods never start: install without --wait.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "DisaggregatedModels created by this release" in done.stdout


def test_helm_install_creates_everything(helm_cluster: Cluster) -> None:
    crd = json.loads(helm_cluster.admin("get", "crd", "disaggregatedmodels.kvrelay.dev", "-o", "json").stdout)
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    deploy = json.loads(helm_cluster.admin("get", "deployment", "-n", RELEASE_NS, SA, "-o", "json").stdout)
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == SA
    # The monitoring API exists on this server, so the capability-gated objects were installed.
    helm_cluster.admin("get", "podmonitor", "-n", RELEASE_NS, SA)
    rule = json.loads(
        helm_cluster.admin("get", "prometheusrule", "-n", RELEASE_NS, RELEASE, "-o", "json").stdout
    )
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} >= {"KvrelayOperatorDown"}
    dashboards = helm_cluster.admin(
        "get", "configmap", "-n", RELEASE_NS, "-l", "grafana_dashboard=1", "-o", "name"
    )
    assert len(dashboards.stdout.split()) == 4
    # The example values' model was admitted by the CRD's schema and CEL rules.
    model = json.loads(
        helm_cluster.admin("get", "disaggregatedmodel", "-n", RELEASE_NS, "llama-8b", "-o", "json").stdout
    )
    DisaggregatedModelSpec.model_validate(model["spec"])


def test_helm_upgrade_with_changed_values_is_accepted(helm_cluster: Cluster) -> None:
    cmd = [
        str(helm_cluster.helm),
        "upgrade",
        RELEASE,
        str(CHART),
        f"--kubeconfig={helm_cluster.plane.kubeconfig}",
    ]
    cmd += ["--namespace", RELEASE_NS, "--reuse-values", "--set", "alerts.slo.ttftSeconds=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rule = json.loads(
        helm_cluster.admin("get", "prometheusrule", "-n", RELEASE_NS, RELEASE, "-o", "json").stdout
    )
    assert "> 3\n" in rule["spec"]["groups"][0]["rules"][0]["expr"]


# (verb, resource, namespace) the operator needs, and what it must be refused.
ALLOWED = [
    ("watch", "disaggregatedmodels.kvrelay.dev", None),
    ("patch", "disaggregatedmodels.kvrelay.dev/status", MODEL_NS),
    ("patch", "deployments.apps", MODEL_NS),
    ("patch", "services", MODEL_NS),
    ("create", "poddisruptionbudgets.policy", MODEL_NS),
    ("patch", "podmonitors.monitoring.coreos.com", MODEL_NS),
    ("patch", "networkpolicies.networking.k8s.io", MODEL_NS),
    ("delete", "networkpolicies.networking.k8s.io", MODEL_NS),  # spec.networkPolicy.enabled=false
    # A worker role is a Deployment or, above gpusPerNode GPUs a replica, a LeaderWorkerSet; the one it
    # no longer is gets deleted when tensorParallel crosses over.
    ("delete", "deployments.apps", MODEL_NS),
    ("create", "events", MODEL_NS),
    ("create", "secrets", MODEL_NS),  # a model's TP link key, created once and never read
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("watch", "endpointslices.discovery.k8s.io", MODEL_NS),
    ("watch", "pods", MODEL_NS),
    ("update", f"leases.coordination.k8s.io/{SA}", RELEASE_NS),
    ("create", "leases.coordination.k8s.io", RELEASE_NS),
]
REFUSED = [
    ("get", "secrets", MODEL_NS),
    ("list", "secrets", MODEL_NS),
    ("watch", "secrets", MODEL_NS),
    ("patch", "secrets", MODEL_NS),
    ("update", "secrets", MODEL_NS),
    ("delete", "secrets", MODEL_NS),
    ("delete", "disaggregatedmodels.kvrelay.dev", MODEL_NS),
    ("create", "clusterroles.rbac.authorization.k8s.io", None),
    ("create", "pods", MODEL_NS),
    ("delete", "pods", MODEL_NS),
    ("update", f"leases.coordination.k8s.io/{SA}", MODEL_NS),
    ("update", "leases.coordination.k8s.io/someone-else", RELEASE_NS),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("deletecollection", "deployments.apps", MODEL_NS),
    ("deletecollection", "networkpolicies.networking.k8s.io", MODEL_NS),
]


def _can_i(helm_cluster: Cluster, verb: str, resource: str, namespace: str | None) -> bool:
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    done = helm_cluster.as_operator("auth", "can-i", verb, resource, *scope, check=False)
    assert done.stdout.strip() in {"yes", "no"}, done.stderr
    return done.stdout.strip() == "yes"


def _review(helm_cluster: Cluster, verb: str, group: str, resource: str, subresource: str = "") -> bool:
    """A SelfSubjectAccessReview as the operator: unlike `kubectl auth can-i`, it needs no discovery of
    the resource, so it answers for kinds this cluster does not serve (LeaderWorkerSet)."""
    attributes = {"verb": verb, "group": group, "resource": resource, "namespace": MODEL_NS}
    if subresource:
        attributes["subresource"] = subresource
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": attributes}}  # fmt: skip
    done = helm_cluster.as_operator("create", "-f", "-", "-o", "json", stdin=json.dumps(review))
    return bool(json.loads(done.stdout)["status"].get("allowed"))


def test_service_account_may_manage_leader_worker_sets_and_nothing_more(helm_cluster: Cluster) -> None:
    group = "leaderworkerset.x-k8s.io"
    for verb in ("get", "list", "watch", "create", "patch", "delete"):
        assert _review(helm_cluster, verb, group, "leaderworkersets"), f"{SA_USER} cannot {verb} LWS"
    assert not _review(helm_cluster, "deletecollection", group, "leaderworkersets")
    assert not _review(helm_cluster, "patch", group, "leaderworkersets", "status")


def test_service_account_may_create_secrets_and_never_read_them(helm_cluster: Cluster) -> None:
    """The TP link Secret is created once and kept: create is all the operator needs, and it must not
    read what other Secrets a model's namespace holds."""
    assert _review(helm_cluster, "create", "", "secrets"), f"{SA_USER} cannot create secrets"
    for verb in ("get", "list", "watch", "patch", "update", "delete", "deletecollection"):
        assert not _review(helm_cluster, verb, "", "secrets"), f"{SA_USER} should not {verb} secrets"


@pytest.mark.parametrize(("verb", "resource", "namespace"), ALLOWED)
def test_service_account_may(helm_cluster: Cluster, verb: str, resource: str, namespace: str | None) -> None:
    assert _can_i(helm_cluster, verb, resource, namespace), (
        f"{SA_USER} cannot {verb} {resource} in {namespace}"
    )


@pytest.mark.parametrize(("verb", "resource", "namespace"), REFUSED)
def test_service_account_may_not(
    helm_cluster: Cluster, verb: str, resource: str, namespace: str | None
) -> None:
    assert not _can_i(helm_cluster, verb, resource, namespace), f"{SA_USER} should not {verb} {resource}"


def test_operator_writes_succeed_as_the_service_account(helm_cluster: Cluster) -> None:
    """Replays the operator's reconcile writes with the ServiceAccount's token: RBAC is enough."""
    cr = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    cr["metadata"] = {"name": "tiny", "namespace": MODEL_NS}
    helm_cluster.admin("apply", "-f", "-", stdin=json.dumps(cr))  # a user creates the model
    live = json.loads(
        helm_cluster.as_operator("get", "disaggregatedmodel", "-n", MODEL_NS, "tiny", "-o", "json").stdout
    )
    spec = DisaggregatedModelSpec.model_validate(live["spec"])
    ctx = resources.RenderContext(
        name="tiny", namespace=MODEL_NS, uid=live["metadata"]["uid"], default_image="kvrelay/kvrelay:test",
        pod_monitor_available=True,
    )  # fmt: skip
    children = resources.render_children(spec, DisaggregatedModelStatus(), ctx)
    kinds = {c["kind"] for c in children}
    assert {"Deployment", "Service", "Role", "RoleBinding", "ServiceAccount", "PodMonitor"} <= kinds
    assert "NetworkPolicy" in kinds
    manifest = "\n---\n".join(json.dumps(c) for c in children)
    # Server-side apply, as the operator does; the Role works only because the SA holds its grants.
    helm_cluster.as_operator(
        "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-", stdin=manifest
    )
    # A second apply of the same spec is a no-op write, and a finalizer patch on the CR works.
    helm_cluster.as_operator(
        "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-", stdin=manifest
    )
    patch = json.dumps({"metadata": {"finalizers": ["kvrelay.dev/operator"]}})
    helm_cluster.as_operator(
        "patch", "disaggregatedmodel", "-n", MODEL_NS, "tiny", "--type=merge", "-p", patch
    )
    status = {"status": {"observedGeneration": live["metadata"]["generation"], "phase": "Progressing"}}
    helm_cluster.as_operator(
        "patch", "disaggregatedmodel", "-n", MODEL_NS, "tiny", "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    after = json.loads(
        helm_cluster.admin("get", "disaggregatedmodel", "-n", MODEL_NS, "tiny", "-o", "json").stdout
    )
    assert after["status"]["phase"] == "Progressing"
    owned = json.loads(helm_cluster.admin("get", "deployments", "-n", MODEL_NS, "-o", "json").stdout)["items"]
    assert {d["metadata"]["ownerReferences"][0]["uid"] for d in owned} == {live["metadata"]["uid"]}
    # The TP link Secret a model spanning nodes gets, created as the operator creates it (a POST).
    spanning = spec.model_copy(update={"prefill": spec.prefill.model_copy(
        update={"tensor_parallel": 16, "gpus_per_node": 8})})  # fmt: skip
    secret = resources.tp_link_secret(spanning, ctx, "0" * 64)
    assert secret is not None
    helm_cluster.as_operator("create", "-f", "-", "-o", "name", stdin=json.dumps(secret))
    stored = json.loads(helm_cluster.admin("get", "secret", "-n", MODEL_NS, secret["metadata"]["name"],
                                           "-o", "json").stdout)  # fmt: skip
    assert stored["metadata"]["ownerReferences"][0]["uid"] == live["metadata"]["uid"]
    # The same ServiceAccount is refused what it should never do.
    refused = helm_cluster.as_operator("get", "secrets", "-n", MODEL_NS, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()
    # Clean up the finalizer so the namespace can go away with the control plane.
    helm_cluster.as_operator("patch", "disaggregatedmodel", "-n", MODEL_NS, "tiny", "--type=json",
                        "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')  # fmt: skip


@contextlib.contextmanager
def operator_process(kubeconfig: Path, args: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """kvrelay-operator as a process authenticated by kubeconfig; stopped on exit, log checked for 403s."""
    command = [sys.executable, "-c", "import sys; from kvrelay_operator.main import main; sys.exit(main())"]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)  # never mistake this for an in-cluster pod
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--liveness=", *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        yield proc
    finally:
        stop_process(proc, grace_s=20)
    text = log_path.read_text()
    assert "forbidden" not in text.lower() and " 403" not in text, text[-3000:]


def _create_tiny(cluster: Cluster, namespace: str, name: str) -> None:
    cr = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    cr["metadata"] = {"name": name, "namespace": namespace}
    cluster.admin("apply", "-f", "-", stdin=json.dumps(cr))


def _wait_reconciled(
    cluster: Cluster, namespace: str, name: str, proc: subprocess.Popen[bytes], log_path: Path
) -> None:
    """Until the model's Deployments exist and its status has observed its generation (90s at most)."""
    want = {f"{name}-{role}" for role in ("prefill", "decode", "router")}
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"operator exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        items = json.loads(cluster.admin("get", "deployments", "-n", namespace, "-o", "json").stdout)["items"]
        live = json.loads(
            cluster.admin("get", "disaggregatedmodel", "-n", namespace, name, "-o", "json").stdout
        )
        observed = live.get("status", {}).get("observedGeneration")
        if want <= {d["metadata"]["name"] for d in items} and observed == live["metadata"]["generation"]:
            return
        assert time.monotonic() < deadline, f"no reconcile in 90s:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)


def test_real_operator_reconciles_as_the_service_account(helm_cluster: Cluster, tmp_path: Path) -> None:
    """kvrelay-operator itself (Lease election + kopf), authenticated as the chart's ServiceAccount."""
    name, log_path, metrics_port = "tiny-op", tmp_path / "operator.log", free_port()
    _create_tiny(helm_cluster, MODEL_NS, name)
    args = ["--all-namespaces", "--leader-elect", f"--lease-namespace={RELEASE_NS}", f"--lease-name={SA}"]
    args += ["--worker-image=kvrelay/kvrelay:test", f"--metrics-port={metrics_port}"]
    with operator_process(helm_cluster.sa_kubeconfig, args, log_path) as proc:
        _wait_reconciled(helm_cluster, MODEL_NS, name, proc, log_path)
        # The chart's PodMonitor target: /metrics answers with the autoscaler's series registered.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert "kvrelay_autoscaler_desired_replicas" in response.read().decode()
        lease = json.loads(helm_cluster.admin("get", "lease", "-n", RELEASE_NS, SA, "-o", "json").stdout)
        assert lease["spec"]["holderIdentity"], lease
        # kopf posts the reconcile's Event with the same token (events: create).
        selector = f"--field-selector=involvedObject.name={name}"
        deadline = time.monotonic() + 30
        while (
            "Created"
            not in helm_cluster.admin("get", "events", "-n", MODEL_NS, selector, "-o", "json").stdout
        ):
            assert time.monotonic() < deadline, f"no Created event:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)


def test_namespace_scoped_release_works_in_its_namespace_only(helm_cluster: Cluster, tmp_path: Path) -> None:
    """operator.watchNamespaces: Roles in those namespaces only, and the real operator works with them."""
    release, release_ns, watched = "scoped", "kvrelay-scoped", "team-a"
    account = f"{release}-kvrelay-operator"
    helm_cluster.admin("create", "namespace", watched)
    cmd = [
        str(helm_cluster.helm),
        "install",
        release,
        str(CHART),
        f"--kubeconfig={helm_cluster.plane.kubeconfig}",
    ]
    cmd += [
        "--namespace",
        release_ns,
        "--create-namespace",
        "--set",
        f"operator.watchNamespaces={{{watched}}}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    kubeconfig = tmp_path / "scoped-kubeconfig"
    _write_sa_kubeconfig(helm_cluster, account, release_ns, kubeconfig)

    def can_i(verb: str, resource: str, namespace: str) -> bool:
        cmd = [
            str(helm_cluster.kubectl),
            f"--kubeconfig={kubeconfig}",
            "auth",
            "can-i",
            verb,
            resource,
            "-n",
            namespace,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip() == "yes"

    assert can_i("patch", "deployments.apps", watched)
    assert not can_i("patch", "deployments.apps", MODEL_NS), "a scoped release must not write elsewhere"
    assert not can_i("list", "disaggregatedmodels.kvrelay.dev", "default")
    name, log_path = "tiny-scoped", tmp_path / "operator.log"
    _create_tiny(helm_cluster, watched, name)
    args = [f"--namespace={watched}", "--leader-elect", f"--lease-namespace={release_ns}"]
    args += [
        f"--lease-name={account}",
        "--worker-image=kvrelay/kvrelay:test",
        f"--metrics-port={free_port()}",
    ]
    with operator_process(kubeconfig, args, log_path) as proc:
        _wait_reconciled(helm_cluster, watched, name, proc, log_path)
