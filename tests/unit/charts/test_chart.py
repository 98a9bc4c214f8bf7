"""The Helm chart: lint, render, validate every manifest, RBAC shape, hardening, CRDs and dashboards."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_helpers import CHART, EXAMPLES, MONITORING_API, ROOT, Render, by_kind, helm_template
from kvrelay_operator import apply, resources
from kvrelay_operator.api import DisaggregatedModelSpec, DisaggregatedModelStatus

VALUE_SETS = [None, *EXAMPLES]
VALUE_IDS = ["default", *[p.stem for p in EXAMPLES]]
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Kinds kubernetes-validate has no schema for, and how this file checks them instead.
CUSTOM_KINDS = {"DisaggregatedModel", "PodMonitor", "ServiceMonitor", "PrometheusRule"}


def values_args(values: Path | None, *extra: str) -> tuple[str, ...]:
    """helm arguments for a values file (None: chart defaults) plus extras."""
    return (*(("-f", str(values)) if values else ()), *extra)


def crd_schema() -> dict:
    """openAPIV3Schema of the DisaggregatedModel CRD shipped in the chart (draft-4 style JSON Schema)."""
    (crd_file,) = (CHART / "crds").glob("*disaggregatedmodels*.yaml")
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_helm_lint_strict(helm: Path, values: Path | None) -> None:
    cmd = [str(helm), "lint", "--strict", str(CHART), *values_args(values)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_every_manifest_validates_strictly(render: Render, values: Path | None, k8s_version: str) -> None:
    manifests = render(
        *values_args(
            values,
            "--include-crds",
            "--api-versions",
            MONITORING_API,
            "--set",
            "alerts.configMap.enabled=true",
        )
    )
    checked = 0
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} invalid for Kubernetes {k8s_version}: {err.message} at {list(err.path)}")
        checked += 1
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "Role", "ConfigMap", "Service"} <= kinds
    assert "CustomResourceDefinition" in kinds
    assert kinds - CUSTOM_KINDS, "nothing was validated"
    assert checked >= 10


@pytest.mark.parametrize("values", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_models_match_crd_and_api(render: Render, values: Path) -> None:
    models = by_kind(render(*values_args(values)), "DisaggregatedModel")
    assert models, f"{values.name} defines no model"
    schema = crd_schema()
    for model in models:
        jsonschema.Draft4Validator(schema).validate(model)
        DisaggregatedModelSpec.model_validate(model["spec"])
        assert model["metadata"]["namespace"] == "kvrelay-system"


def test_crd_schema_check_can_fail() -> None:
    bad = {"apiVersion": "kvrelay.dev/v1alpha1", "kind": "DisaggregatedModel", "metadata": {"name": "x"}}
    bad["spec"] = {"model": {"source": "org/m"}, "decode": {"tensorParallel": "eight"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(crd_schema()).validate(bad)


def test_rdma_example_places_pools_on_their_gpus(render: Render) -> None:
    (values,) = [p for p in EXAMPLES if "rdma" in p.stem]
    (model,) = by_kind(render(*values_args(values)), "DisaggregatedModel")
    spec = model["spec"]
    assert "H100" in spec["prefill"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert "A100" in spec["decode"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert spec["kvTransfer"]["transport"] == "rdma" and spec["kvTransfer"]["backend"] == "nixl"


def test_monitoring_objects_only_when_the_api_exists(render: Render) -> None:
    without = {m["kind"] for m in render()}
    assert not without & {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    with_api = render("--api-versions", MONITORING_API)
    assert len(by_kind(with_api, "PodMonitor")) == 1
    assert len(by_kind(with_api, "PrometheusRule")) == 1
    assert not by_kind(with_api, "ServiceMonitor"), "ServiceMonitor is opt-in"
    both = render("--api-versions", MONITORING_API, "--set", "monitoring.serviceMonitor.enabled=true")
    (monitor,) = by_kind(both, "ServiceMonitor")
    (service,) = by_kind(both, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_operator_deployment_is_hardened_and_redundant(render: Render) -> None:
    (deploy,) = by_kind(render(), "Deployment")
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    dockerfile_user = re.search(r"^USER (\d+)", (ROOT / "worker_image" / "Dockerfile").read_text(), re.M)
    assert dockerfile_user and pod["securityContext"]["runAsUser"] == int(dockerfile_user.group(1))
    (sa,) = by_kind(render(), "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert (
        deploy["spec"]["selector"]["matchLabels"].items()
        <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )
    (pdb,) = by_kind(render(), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    single = render("--set", "operator.replicaCount=1")
    assert not by_kind(single, "PodDisruptionBudget"), "a PDB with one replica would block node drains"


def _grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


# apiVersion group and resource of each kind the operator writes (children of a DisaggregatedModel).
KIND_TO_RESOURCE = {
    "Service": ("", "services"),
    "ServiceAccount": ("", "serviceaccounts"),
    "Deployment": ("apps", "deployments"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "PodMonitor": ("monitoring.coreos.com", "podmonitors"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
    "Job": ("batch", "jobs"),
    "LeaderWorkerSet": ("leaderworkerset.x-k8s.io", "leaderworkersets"),
}
# Server-side apply is a patch (plus create for a new object); kopf lists and watches children.
CHILD_VERBS = {"get", "list", "watch", "create", "patch"}


def operator_child_kinds() -> set[str]:
    """Kinds resources.render_children writes for the repo's example models (PodMonitor forced on), for
    one with spec.model.cache (its claim and fill Job) and one whose prefill spans nodes (LWS)."""
    kinds: set[str] = set()
    specs = [yaml.safe_load(path.read_text())["spec"] for path in sorted((ROOT / "examples").glob("*.yaml"))]
    cached = {**specs[0], "model": {"source": "org/model", "cache": {"size": "10Gi"}}}
    spanning = {**specs[0], "prefill": {"tensorParallel": 16, "gpusPerNode": 8}}
    for raw in [*specs, cached, spanning]:
        spec = DisaggregatedModelSpec.model_validate(raw)
        ctx = resources.RenderContext(
            name="m", namespace="ns", uid="u", default_image="img", pod_monitor_available=True
        )
        kinds |= {c["kind"] for c in resources.render_children(spec, DisaggregatedModelStatus(), ctx)}
    return kinds


def test_rbac_covers_every_child_the_operator_writes(render: Render) -> None:
    (cluster_role,) = by_kind(render(), "ClusterRole")
    grants = _grants(cluster_role["rules"])
    kinds = operator_child_kinds()
    assert {"Deployment", "Service", "PodMonitor", "NetworkPolicy", "LeaderWorkerSet"} <= kinds
    for kind in sorted(kinds):
        assert kind in KIND_TO_RESOURCE, f"operator now writes {kind}: add it to the chart's ClusterRole"
        group, resource = KIND_TO_RESOURCE[kind]
        missing = {v for v in CHILD_VERBS if (group, resource, v) not in grants}
        assert not missing, f"ClusterRole lacks {sorted(missing)} on {group or 'core'}/{resource}"
    # Grants for children no longer written would be excess privilege. The TP link Secret is not a
    # rendered child (created once, never applied) but is written too.
    written = {KIND_TO_RESOURCE[k] for k in kinds} | {("", "secrets")}
    child_grants = {(g, r) for g, r, v in grants if v == "create"} - {
        ("", "events"),
        ("events.k8s.io", "events"),
    }
    assert child_grants == written


def test_rbac_is_least_privilege(render: Render) -> None:
    manifests = render()
    (cluster_role,) = by_kind(manifests, "ClusterRole")
    grants = _grants(cluster_role["rules"])
    assert ("kvrelay.dev", "disaggregatedmodels/status", "patch") in grants
    assert ("discovery.k8s.io", "endpointslices", "watch") in grants
    assert ("apiextensions.k8s.io", "customresourcedefinitions", "list") in grants
    assert ("", "events", "create") in grants
    # Pods are read (the scheduler's reasons go into the model's status) and patched only for their
    # deletion cost, which the chart's ValidatingAdmissionPolicy enforces (tested below).
    assert {g[2] for g in grants if g[1] == "pods"} == {"get", "list", "watch", "patch"}
    assert len(by_kind(manifests, "ValidatingAdmissionPolicy")) == 1
    # Secrets: create only (the TP link key of a model whose groups span pods); never read, so a
    # compromised operator cannot read the namespace's secrets.
    assert {g for g in grants if "secrets" in g[1]} == {("", "secrets", "create")}
    # Never: wildcards, pod writes or exec, cluster-wide RBAC, escalation, deleting the CR or CRDs.
    assert not {g for g in grants if "*" in g}
    forbidden = {"pods/exec", "pods/eviction", "clusterroles", "clusterrolebindings", "nodes"}
    assert not {g for g in grants if g[1] in forbidden}
    assert ("kvrelay.dev", "disaggregatedmodels", "delete") not in grants
    assert ("apiextensions.k8s.io", "customresourcedefinitions", "create") not in grants
    assert not {g for g in grants if g[2] in {"escalate", "bind", "impersonate", "deletecollection"}}
    # Deletes only of the kinds the operator prunes (apply.PRUNED_KINDS): NetworkPolicies turned off, model
    # cache Jobs replaced by newer fills, a cache claim whose cache was removed, a worker role's
    # Deployment or LeaderWorkerSet once tensorParallel made it the other.
    pruned = {KIND_TO_RESOURCE[k] for k in apply.PRUNED_KINDS}
    assert {g for g in grants if g[2] == "delete"} == {(*r, "delete") for r in pruned}
    assert pruned == {
        ("networking.k8s.io", "networkpolicies"),
        ("", "persistentvolumeclaims"),
        ("batch", "jobs"),
        ("apps", "deployments"),
        ("leaderworkerset.x-k8s.io", "leaderworkersets"),
    }
    (role,) = by_kind(manifests, "Role")  # only the Lease Role when watching every namespace
    assert role["metadata"]["namespace"] == "kvrelay-system"
    assert {g[:2] for g in _grants(role["rules"])} == {("coordination.k8s.io", "leases")}
    sa_name = by_kind(manifests, "ServiceAccount")[0]["metadata"]["name"]
    for binding in by_kind(manifests, "ClusterRoleBinding") + by_kind(manifests, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa_name, "namespace": "kvrelay-system"}
        ]


def _operator_env(manifests: list[dict]) -> dict[str, str]:
    """The operator container's literal env (downward-API entries as their field path)."""
    (deploy,) = by_kind(manifests, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath"))
            for e in container["env"]}  # fmt: skip


def test_operator_learns_who_may_reach_the_models_metrics_ports(render: Render) -> None:
    manifests = render()
    env = _operator_env(manifests)
    assert env[resources.OPERATOR_NAMESPACE_ENV] == "metadata.namespace"  # the release namespace
    config = resources.NetworkPolicyConfig.from_env(
        {**env, resources.OPERATOR_NAMESPACE_ENV: "kvrelay-system"}
    )
    # The policies' operator peer selects exactly the chart's operator pods.
    (deploy,) = by_kind(manifests, "Deployment")
    assert config.operator_pod_labels == deploy["spec"]["selector"]["matchLabels"]
    assert config.operator_pod_labels.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert resources.operator_peer(config)["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "kvrelay-system"}
    }
    assert [p.model_dump(by_alias=True, exclude_none=True) for p in config.metrics_from] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    # The operator's own default is the chart's default.
    assert resources.NetworkPolicyConfig().metrics_from == config.metrics_from
    custom = [{"podSelector": {"matchLabels": {"app": "prometheus"}}, "namespaceSelector": {}},
              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]  # fmt: skip
    for metrics_from, want in ((custom, custom), ([], []), (None, [])):
        env = _operator_env(render("--set-json", f"networkPolicy.metricsFrom={json.dumps(metrics_from)}"))
        parsed = resources.NetworkPolicyConfig.from_env(env).metrics_from
        assert [p.model_dump(by_alias=True, exclude_none=True) for p in parsed] == want


def test_values_schema_refuses_a_malformed_metrics_peer(helm: Path) -> None:
    with pytest.raises(AssertionError, match="metricsFrom"):
        helm_template(helm, "--set-json", 'networkPolicy.metricsFrom=[{"namespace": "monitoring"}]')


def _pod_verbs(manifests: list[dict]) -> set[str]:
    rules = [r for m in by_kind(manifests, "ClusterRole") + by_kind(manifests, "Role") for r in m["rules"]]
    return {verb for _, resource, verb in _grants(rules) if resource == "pods"}


@pytest.mark.parametrize("extra", [(), ("--set", "operator.watchNamespaces={team-a}")], ids=["all", "scoped"])
def test_pod_patch_is_granted_only_with_the_policy_that_limits_it(
    render: Render, extra: tuple[str, ...]
) -> None:
    manifests = render(*extra)
    (policy,) = by_kind(manifests, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(manifests, "ValidatingAdmissionPolicyBinding")
    sa_name = by_kind(manifests, "ServiceAccount")[0]["metadata"]["name"]
    assert "patch" in _pod_verbs(manifests)
    # The policy is for the operator's ServiceAccount only, on every update of a pod, and denies.
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == (
        f'request.userInfo.username == "system:serviceaccount:kvrelay-system:{sa_name}"'
    )
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["operations"], rule["resources"]) == (
        [""],
        ["UPDATE"],
        ["pods", "pods/*"],
    )
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    # The CEL compares the whole rest of the pod (tests/controlplane/test_pod_deletion_cost.py runs it).
    cel = " ".join(v["expression"] for v in policy["spec"]["validations"])
    for kept in (
        "object.spec == oldObject.spec",
        "labels",
        "ownerReferences",
        "finalizers",
        "oldAnnotations",
    ):
        assert kept in cel
    # Without the policy there is no pod write at all.
    off = render(*extra, "--set", "rbac.podDeletionCost=false")
    assert not by_kind(off, "ValidatingAdmissionPolicy") and not by_kind(
        off, "ValidatingAdmissionPolicyBinding"
    )
    assert _pod_verbs(off) == {"get", "list", "watch"}
    assert not by_kind(render(*extra, "--set", "rbac.create=false"), "ValidatingAdmissionPolicy")


def test_watching_namespaces_grants_only_in_them(render: Render) -> None:
    cluster_wide = _grants(by_kind(render(), "ClusterRole")[0]["rules"])
    scoped = render("--set", "operator.watchNamespaces={team-a,kvrelay-system}")
    (cluster_role,) = by_kind(scoped, "ClusterRole")
    assert {g[:2] for g in _grants(cluster_role["rules"])} == {
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),  # kopf observes the Namespaces it was given by name
    }
    watch_roles = {
        r["metadata"]["namespace"]: r
        for r in by_kind(scoped, "Role")
        if r["metadata"]["name"].endswith("-watch")
    }
    assert set(watch_roles) == {"team-a", "kvrelay-system"}
    crd_reads = {g for g in cluster_wide if g[1] == "customresourcedefinitions"}
    for role in watch_roles.values():
        assert _grants(role["rules"]) == cluster_wide - crd_reads
    assert not {g for g in cluster_wide if g[1] == "namespaces"}, "cluster-wide kopf does not list Namespaces"
    bindings = [b for b in by_kind(scoped, "RoleBinding") if b["roleRef"]["name"].endswith("-watch")]
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "kvrelay-system"}
    names = [(m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]) for m in scoped]
    assert len(names) == len(set(names)), "two objects share a kind, namespace and name"


def test_dashboards_ship_as_sidecar_configmaps(render: Render) -> None:
    maps = [
        m for m in by_kind(render(), "ConfigMap") if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    committed = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    assert len(committed) == 4
    shipped = {name: json.loads(text) for m in maps for name, text in m["data"].items()}
    assert shipped == committed
    elsewhere = render("--set", "dashboards.namespace=monitoring", "--set", "dashboards.enabled=true")
    namespaces = {
        m["metadata"]["namespace"]
        for m in by_kind(elsewhere, "ConfigMap")
        if "grafana_dashboard" in m["metadata"]["labels"]
    }
    assert namespaces == {"monitoring"}
    assert not [m for m in by_kind(render("--set", "dashboards.enabled=false"), "ConfigMap")]


def test_chart_crds_are_the_generated_ones() -> None:
    generated = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert generated, "crds/ is empty: run kvrelay-render-crds"
    assert shipped == generated, "charts/kvrelay/crds is stale: run charts/kvrelay/sync-crds.sh"


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operator.replicaCount=0", "replicaCount"),
        ("alerts.slo.quantile=1.5", "quantile"),
        ("alerts.bogus=1", "bogus"),
        ("monitoring.podMonitor.interval=soon", "interval"),
    ],
)
def test_values_schema_refuses_bad_values(helm: Path, setting: str, complaint: str) -> None:
    with pytest.raises(AssertionError, match=complaint):
        helm_template(helm, "--set", setting)


def test_notes_say_what_to_do_next(helm: Path) -> None:
    cmd = [str(helm), "install", "t", str(CHART), "--dry-run=client", "--namespace", "kvrelay-system"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "kind: DisaggregatedModel" in notes
    assert "monitoring.coreos.com/v1) was not found" in notes


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_operator_args_parse_with_the_operators_own_parser(render: Render, values: Path | None) -> None:
    from kvrelay_operator.main import build_parser

    (deploy,) = by_kind(render(*values_args(values)), "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kvrelay-operator"]
    args = build_parser().parse_args(container["args"])
    assert args.leader_elect and args.lease_namespace == "kvrelay-system"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == args.metrics_port and args.metrics_port > 0
    assert f":{ports['health']}/" in args.liveness
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert "readinessProbe" not in container, "the standby never runs kopf: a readiness probe would fail"
    (role,) = by_kind(render(*values_args(values)), "Role")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named[0]["resourceNames"] == [args.lease_name], "the Role must cover the Lease the operator uses"
    assert args.all_namespaces or args.namespace
    scoped = render("--set", "operator.watchNamespaces={a,b}")
    (scoped_container,) = by_kind(scoped, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(scoped_container["args"]).namespace == ["a", "b"]
