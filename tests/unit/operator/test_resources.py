"""resources.py: spec -> child manifests, checked field by field (pure, no cluster)."""

from __future__ import annotations

import importlib
import json
import pathlib
import re
from typing import Any

import kubernetes_validate
import pytest
from kvrelay_operator import api, replicas, resources
from kvrelay_operator.resources import RenderContext

CTX = RenderContext(name="m", namespace="ns", uid="uid-1", default_image="reg/kvrelay:1")
NO_STATUS = api.DisaggregatedModelStatus()


def spec(**over: Any) -> api.DisaggregatedModelSpec:
    return api.DisaggregatedModelSpec.model_validate({"model": {"source": "org/model"}, **over})


def render(s: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus = NO_STATUS, **ctx: Any):
    return resources.render_children(s, status, CTX.model_copy(update=ctx))


def by_kind_name(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def container(children: list[dict[str, Any]], role: str) -> dict[str, Any]:
    return by_kind_name(children)[("Deployment", f"m-{role}")]["spec"]["template"]["spec"]["containers"][0]


def pod(children: list[dict[str, Any]], role: str) -> dict[str, Any]:
    return by_kind_name(children)[("Deployment", f"m-{role}")]["spec"]["template"]["spec"]


def test_children_set_owners_and_labels() -> None:
    children = render(spec())
    assert sorted(by_kind_name(children)) == sorted(
        [(k, f"m-{r}") for r in ("prefill", "decode", "router") for k in ("Deployment", "Service")]
        + [("PodDisruptionBudget", f"m-{r}") for r in ("prefill", "decode", "router")]
        + [("ServiceAccount", "m-router"), ("Role", "m-router"), ("RoleBinding", "m-router")]
        + [("NetworkPolicy", f"m-{r}") for r in ("prefill", "decode", "router")]
    )
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["ownerReferences"] == [
            {"apiVersion": "kvrelay.dev/v1alpha1", "kind": "DisaggregatedModel", "name": "m", "uid": "uid-1",
             "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
        assert meta["labels"]["app.kubernetes.io/name"] == "kvrelay"
        assert meta["labels"]["app.kubernetes.io/instance"] == "m"
    deployment = by_kind_name(children)[("Deployment", "m-decode")]
    assert deployment["metadata"]["labels"]["kvrelay.dev/role"] == "decode"
    assert deployment["spec"]["template"]["metadata"]["labels"]["kvrelay.dev/role"] == "decode"
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kvrelay", "app.kubernetes.io/instance": "m", "kvrelay.dev/role": "decode"
    }  # fmt: skip


def test_gpus_follow_tensor_parallel_and_placement() -> None:
    s = spec(
        prefill={"tensorParallel": 2, "nodeSelector": {"pool": "h100"},
                 "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 "resources": {"requests": {"cpu": 4, "memory": "16Gi"}}},
        decode={"tensorParallel": 4, "nodeSelector": {"pool": "l40s"}},
    )  # fmt: skip
    children = render(s)
    prefill = container(children, "prefill")
    assert prefill["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert prefill["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}
    assert container(children, "decode")["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod(children, "prefill")["nodeSelector"] == {"pool": "h100"}
    assert pod(children, "prefill")["tolerations"] == [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod(children, "decode")["nodeSelector"] == {"pool": "l40s"}
    assert "nvidia.com/gpu" not in container(children, "router").get("resources", {}).get("limits", {})


def test_worker_command_follows_the_contract() -> None:
    s = spec(
        kvTransfer={"backend": "tcp", "port": 6000, "failurePolicy": "fail"}, model={"source": "/models/x"}
    )
    c = container(render(s), "decode")
    assert c["command"] == ["kvrelay-worker"]
    args = c["args"]
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert pairs["--role"] == "decode" and pairs["--model"] == "/models/x"
    assert pairs["--grpc-port"] == "8001" and pairs["--metrics-port"] == "9090"
    assert (
        pairs["--kv-backend"] == "tcp"
        and pairs["--kv-port"] == "6000"
        and pairs["--kv-failure-policy"] == "fail"
    )
    assert pairs["--served-model-name"] == "m" and pairs["--max-num-seqs"] == "256"
    assert (
        "--role" in container(render(s), "prefill")["args"]
        and "--max-batch-tokens" in container(render(s), "prefill")["args"]
    )


def test_rdma_adds_devices_ipc_lock_and_ucx_env() -> None:
    s = spec(kvTransfer={"transport": "rdma", "rdma": {"resourceName": "rdma/hca", "count": 2,
                                                       "netDevices": "mlx5_0:1"}})  # fmt: skip
    c = container(render(s), "prefill")
    assert c["resources"]["limits"]["rdma/hca"] == "2"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["UCX_TLS"].startswith("rc,") and env["UCX_NET_DEVICES"] == "mlx5_0:1"
    plain = container(render(spec()), "prefill")
    assert "add" not in plain["securityContext"]["capabilities"]
    assert "UCX_TLS" not in {e["name"] for e in plain["env"]}
    assert "rdma/ib" not in plain["resources"]["limits"]


def test_pods_run_as_the_worker_images_user() -> None:
    dockerfile = pathlib.Path(__file__).parents[3] / "worker_image" / "Dockerfile"
    user = re.search(r"^USER (\d+)", dockerfile.read_text(), re.MULTILINE)
    assert user, "worker_image/Dockerfile has no numeric USER"
    assert int(user.group(1)) == resources.RUN_AS_USER


def test_pod_hardening_shm_probes_and_spread() -> None:
    children = render(spec(prefill={"shmSize": "16Gi"}))
    p = pod(children, "prefill")
    assert p["securityContext"]["runAsNonRoot"] is True and p["securityContext"]["runAsUser"] == 10001
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in p["volumes"]
    c = p["containers"][0]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # slow model loads
    # /ready: 200 once loaded, 503 from the drain's start; /metrics keeps answering while draining.
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    anti = p["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert p["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"


def test_drain_seconds_set_the_flag_and_the_termination_grace() -> None:
    children = render(spec(prefill={"drainSeconds": 30}, decode={"drainSeconds": 600}))
    for role, drain in (("prefill", 30), ("decode", 600)):
        args = container(children, role)["args"]
        assert args[args.index("--drain-seconds") + 1] == str(drain)
        # The kubelet's SIGKILL comes after the worker's own deadline and its exit (stream ends, teardown).
        grace = pod(children, role)["terminationGracePeriodSeconds"]
        assert grace == drain + resources.DRAIN_EXIT_MARGIN_S and 5 <= resources.DRAIN_EXIT_MARGIN_S <= 30
        assert "lifecycle" not in container(children, role)  # no preStop: the worker drains on SIGTERM
    default = render(spec())
    assert pod(default, "decode")["terminationGracePeriodSeconds"] == 120 + resources.DRAIN_EXIT_MARGIN_S
    assert "terminationGracePeriodSeconds" not in pod(default, "router")


def test_user_affinity_is_kept() -> None:
    node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
    p = pod(render(spec(decode={"affinity": {"nodeAffinity": node_affinity}})), "decode")
    assert p["affinity"]["nodeAffinity"] == node_affinity and "podAntiAffinity" in p["affinity"]


def test_model_sources() -> None:
    pvc = render(spec(model={"source": "pvc://weights/llama/8b"}))
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod(
        pvc, "prefill"
    )["volumes"]
    assert container(pvc, "prefill")["args"][3] == "/models/llama/8b"
    assert "initContainers" not in pod(pvc, "prefill")
    hf = pod(render(spec(model={"source": "org/model", "revision": "abc"})), "decode")
    assert hf["initContainers"][0]["command"] == ["hf", "download", "org/model", "--local-dir", "/models/hf",
                                                  "--revision", "abc"]  # fmt: skip


def _model_flag(c: dict[str, Any]) -> str:
    return c["args"][c["args"].index("--model") + 1]


GGUF_ENV = ["POD_NAME", "POD_NAMESPACE", "POD_IP", "KVRELAY_ROLE", "HF_HOME"]
IMPORTED = {"name": "imported-model", "emptyDir": {}}
IMPORTED_MOUNT = {"name": "imported-model", "mountPath": "/var/lib/kvrelay"}


@pytest.mark.parametrize(
    ("source", "model_volume", "gguf_path", "importer_mounts"),
    [
        # The importer must see the image's /models, so no volume is mounted over it.
        ("/models/smollm2.gguf", None, "/models/smollm2.gguf", []),
        # The claim stays read-only; the importer reads it and writes the emptyDir.
        (
            "pvc://weights/gguf/model.gguf",
            {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            "/models/gguf/model.gguf",
            [{"name": "model", "mountPath": "/models"}],
        ),
    ],
    ids=["image", "pvc"],
)
def test_gguf_sources_are_imported_by_an_init_container(
    source: str, model_volume: dict[str, Any] | None, gguf_path: str, importer_mounts: list[dict[str, Any]]
) -> None:
    children = render(spec(model={"source": source}, image="mine:2", imagePullPolicy="Always"))
    for role in ("prefill", "decode", "router"):
        p, c = pod(children, role), container(children, role)
        (init,) = p["initContainers"]
        assert init["name"] == "import-gguf"
        assert init["command"] == [
            "kvrelay", "import-gguf", gguf_path, "/var/lib/kvrelay/imported", "--overwrite"
        ]  # fmt: skip
        assert init["image"] == "mine:2" and init["imagePullPolicy"] == "Always"
        assert init["volumeMounts"] == [*importer_mounts, IMPORTED_MOUNT]
        assert init["securityContext"] == c["securityContext"] == {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": False,
        }  # fmt: skip
        assert [e["name"] for e in init["env"]] == GGUF_ENV
        assert _model_flag(c) == "/var/lib/kvrelay/imported"
        model_mounts = [] if model_volume is None else [{"name": "model", "mountPath": "/models"}]
        assert p["volumes"][: len(model_mounts) + 1] == [*([model_volume] if model_volume else []), IMPORTED]
        assert c["volumeMounts"][: len(model_mounts) + 1] == [
            *model_mounts,
            {**IMPORTED_MOUNT, "readOnly": True},
        ]
    names = ["imported-model", "dshm"] if model_volume is None else ["model", "imported-model", "dshm"]
    assert [v["name"] for v in pod(children, "decode")["volumes"]] == names
    assert [m["name"] for m in container(children, "decode")["volumeMounts"]] == names


def test_gguf_init_command_parses_with_the_real_importer(tmp_path: pathlib.Path) -> None:
    """Contract check: the importer takes the rendered argv (it then fails only on the missing file)."""
    gguf_import = importlib.import_module("kvrelay_worker.model.gguf_import")

    (init,) = pod(render(spec(model={"source": "pvc://w/m.gguf"})), "decode")["initContainers"]
    assert init["command"][:2] == ["kvrelay", "import-gguf"]
    argv = [str(tmp_path / "m.gguf"), str(tmp_path / "imported"), *init["command"][4:]]
    assert gguf_import.main(argv) == 2  # GGUFImportError (no such file), not an argparse exit


@pytest.mark.parametrize(
    ("source", "inits", "model_path"),
    [("pvc://weights.gguf", [], "/models"), ("org/model.gguf", ["download-model"], "/models/hf"),
     ("/models/llama", [], "/models/llama")],
)  # fmt: skip
def test_non_gguf_paths_are_not_imported(source: str, inits: list[str], model_path: str) -> None:
    """Only a file path ending in .gguf is imported: a claim alone, a repo id or a directory is not."""
    children = render(spec(model={"source": source}))
    p = pod(children, "decode")
    assert "imported-model" not in [v["name"] for v in p["volumes"]]
    assert [i["name"] for i in p.get("initContainers", [])] == inits
    assert _model_flag(container(children, "decode")) == model_path


def test_an_image_path_is_not_hidden_by_a_volume() -> None:
    """A model baked into the image at /models/x must stay visible: nothing is mounted on /models."""
    children = render(spec(model={"source": "/models/tiny"}))
    for role in ("prefill", "decode", "router"):
        mounts = [m["mountPath"] for m in container(children, role).get("volumeMounts", [])]
        assert not [m for m in mounts if "/models/tiny".startswith(m.rstrip("/") + "/")], (role, mounts)
        assert "model" not in [v["name"] for v in pod(children, role).get("volumes", [])]


def test_router_deployment_service_and_rbac() -> None:
    s = spec(router={"replicas": 3, "serviceType": "LoadBalancer", "port": 8080,
                     "apiKeySecret": {"name": "keys"}})  # fmt: skip
    children = by_kind_name(render(s))
    assert children[("Deployment", "m-router")]["spec"]["replicas"] == 3
    svc = children[("Service", "m-router")]["spec"]
    assert svc["type"] == "LoadBalancer" and svc["ports"][0]["port"] == 8080
    c = children[("Deployment", "m-router")]["spec"]["template"]["spec"]["containers"][0]
    pairs = dict(zip(c["args"][::2], c["args"][1::2], strict=False))
    assert (
        pairs["--discovery"] == "kubernetes" and pairs["--instance"] == "m" and pairs["--namespace"] == "ns"
    )
    assert pairs["--api-key-file"] == "/var/run/secrets/kvrelay/api-key"
    assert children[("Role", "m-router")]["rules"][0]["resources"] == ["endpointslices"]
    for role in ("prefill", "decode"):
        headless = children[("Service", f"m-{role}")]["spec"]
        assert headless["clusterIP"] == "None" and headless["ports"][0]["name"] == "grpc"


def test_pod_monitor_only_when_wanted() -> None:
    assert ("PodMonitor", "m") not in by_kind_name(render(spec()))
    assert ("PodMonitor", "m") in by_kind_name(render(spec(), pod_monitor_available=True))
    assert ("PodMonitor", "m") in by_kind_name(render(spec(monitoring={"podMonitor": "enabled"})))
    forced_off = spec(monitoring={"podMonitor": "disabled"})
    assert ("PodMonitor", "m") not in by_kind_name(render(forced_off, pod_monitor_available=True))


# ---------------------------------------------------------------- NetworkPolicies


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-only label selector selects an object with these labels."""
    assert set(selector) <= {"matchLabels"}, "the operator's own selectors use matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def pod_labels(children: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Role -> the pod template labels of its Deployment."""
    return {
        c["metadata"]["labels"]["kvrelay.dev/role"]: c["spec"]["template"]["metadata"]["labels"]
        for c in children
        if c["kind"] == "Deployment"
    }


def policies(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Role -> the spec of its NetworkPolicy."""
    return {
        c["metadata"]["labels"]["kvrelay.dev/role"]: c["spec"]
        for c in children
        if c["kind"] == "NetworkPolicy"
    }


def admitted(rule: dict[str, Any], pods: dict[str, dict[str, str]]) -> set[str]:
    """Which of these pods (name -> labels, all in the model's namespace) a rule's `from` admits."""
    same_namespace = [p["podSelector"] for p in rule["from"] if set(p) == {"podSelector"}]
    return {name for name, labels in pods.items() if any(selects(s, labels) for s in same_namespace)}


def test_network_policies_select_each_roles_pods_and_admit_only_their_peers() -> None:
    mine, other = render(spec()), render(spec(), name="o", uid="uid-2")
    # Pods of both models of this namespace, by role ("o-" for the other model).
    pods = {**pod_labels(mine), **{f"o-{r}": labels for r, labels in pod_labels(other).items()}}
    for role, policy in policies(mine).items():
        assert policy["policyTypes"] == ["Ingress"], "egress stays open (DNS, model downloads, API server)"
        assert {name for name, labels in pods.items() if selects(policy["podSelector"], labels)} == {role}
    prefill, decode, router = (policies(mine)[r] for r in ("prefill", "decode", "router"))
    for policy, other_role in ((prefill, "decode"), (decode, "prefill")):
        grpc, kv, metrics = policy["ingress"]
        assert admitted(grpc, pods) == {"router"}
        assert admitted(kv, pods) == {other_role} and kv["ports"] == [{"protocol": "TCP"}]  # every TCP port
        assert admitted(metrics, pods) == set(), "no pod of the namespace reaches the metrics port"
        assert metrics["from"] == [
            {"namespaceSelector": {},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kvrelay-operator",
                                             "app.kubernetes.io/component": "operator"}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        ]  # fmt: skip
    (public,) = router["ingress"]
    assert "from" not in public, "the router's port is open to every source (the API key guards it)"


def test_network_policy_ports_are_the_containers_ports() -> None:
    children = render(spec(router={"port": 9000}, kvTransfer={"port": 5700}))
    for role in ("prefill", "decode"):
        ports = {p["name"]: p["containerPort"] for p in container(children, role)["ports"]}
        grpc, kv, metrics = policies(children)[role]["ingress"]
        assert grpc["ports"] == [{"protocol": "TCP", "port": ports["grpc"]}]
        assert metrics["ports"] == [{"protocol": "TCP", "port": ports["metrics"]}]
        assert ports["kv"] == 5700 and kv["ports"] == [{"protocol": "TCP"}]  # the KV port among them
        assert {p["protocol"] for p in container(children, role)["ports"]} == {"TCP"}
    (public,) = policies(children)["router"]["ingress"]
    assert public["ports"] == [
        {"protocol": "TCP", "port": container(children, "router")["ports"][0]["containerPort"]}
    ]
    assert public["ports"][0]["port"] == 9000


def test_network_policies_off_when_disabled() -> None:
    assert not policies(render(spec(networkPolicy={"enabled": False})))
    assert len(render(spec(networkPolicy={"enabled": False}))) == len(render(spec())) - 3


def test_router_from_narrows_the_router_and_monitoring_keeps_its_metrics() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}}
    block = {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
    (public,) = policies(render(spec(networkPolicy={"routerFrom": [peer, block]})))["router"]["ingress"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert public["from"] == [peer, block, monitoring]


def test_operator_settings_place_the_operator_and_monitoring_peers() -> None:
    operator_labels = {"app.kubernetes.io/name": "x-operator", "app.kubernetes.io/instance": "x"}
    config = resources.NetworkPolicyConfig.from_env({
        "POD_NAMESPACE": "kvrelay-system",
        "KVRELAY_OPERATOR_POD_LABELS": json.dumps(operator_labels),
        "KVRELAY_NETWORK_POLICY_METRICS_FROM": "[]",
    })  # fmt: skip
    for role in ("prefill", "decode"):
        _, _, metrics = policies(render(spec(), network_policy=config))[role]["ingress"]
        # Never an empty `from`: that would admit every source. The operator is always there.
        assert metrics["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kvrelay-system"}},
             "podSelector": {"matchLabels": operator_labels}}
        ]  # fmt: skip
    (public,) = policies(
        render(spec(networkPolicy={"routerFrom": [{"podSelector": {}}]}), network_policy=config)
    )["router"]["ingress"]
    assert public["from"] == [{"podSelector": {}}]
    assert resources.NetworkPolicyConfig.from_env({}) == resources.NetworkPolicyConfig()
    with pytest.raises(ValueError, match="a peer is an ipBlock"):
        resources.NetworkPolicyConfig.from_env({"KVRELAY_NETWORK_POLICY_METRICS_FROM": "[{}]"})


@pytest.mark.parametrize("k8s_version", ["1.30.0", kubernetes_validate.latest_version()])
def test_network_policies_are_valid_networking_v1(k8s_version: str) -> None:
    narrowed = spec(networkPolicy={"routerFrom": [
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
        {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
         "podSelector": {}},
    ]})  # fmt: skip
    for s in (spec(), narrowed):
        for child in render(s):
            if child["kind"] == "NetworkPolicy":
                kubernetes_validate.validate(child, k8s_version, strict=True)


def test_image_default_and_override() -> None:
    assert container(render(spec()), "decode")["image"] == "reg/kvrelay:1"
    assert container(render(spec(image="mine:2")), "decode")["image"] == "mine:2"


def test_config_change_rolls_pods_but_replicas_do_not() -> None:
    def config_hash(s: api.DisaggregatedModelSpec, role: str = "decode") -> str:
        d = by_kind_name(render(s))[("Deployment", f"m-{role}")]
        return d["spec"]["template"]["metadata"]["annotations"]["kvrelay.dev/config-hash"]

    base = config_hash(spec())
    assert config_hash(spec(model={"source": "org/model", "maxModelLen": 8192})) != base
    assert config_hash(spec(decode={"replicas": 3})) == base
    # One model config for every role: a decode batch limit rolls the router too.
    assert config_hash(spec(decode={"maxRunningSequences": 7}), "router") != config_hash(spec(), "router")
    # The settings reach pods as flags; no ConfigMap child carries them (none was ever mounted).
    assert not [c for c in render(spec()) if c["kind"] == "ConfigMap"]


@pytest.mark.parametrize(
    ("mode", "desired", "expected"),
    [("off", 5, 2), ("advisory", 5, 2), ("auto", 5, 5), ("auto", 50, 8), ("auto", 0, 1), ("auto", None, 2)],
)
def test_target_replicas(mode: str, desired: int | None, expected: int) -> None:
    s = spec(decode={"replicas": 2, "minReplicas": 1, "maxReplicas": 8}, autoscaling={"mode": mode})
    status = api.DisaggregatedModelStatus(decode=api.RoleStatus(desired_replicas=desired))
    assert replicas.target_replicas(s, status, "decode") == expected
    d = by_kind_name(render(s, status))[("Deployment", "m-decode")]
    assert d["spec"]["replicas"] == expected


def test_render_is_deterministic() -> None:
    assert render(spec()) == render(spec())


def test_rendered_command_lines_parse_with_the_real_entrypoints() -> None:
    """Contract check: every flag the operator renders is one kvrelay-worker / the router accepts."""
    entrypoint = importlib.import_module("kvrelay_worker.entrypoint")
    router_main = importlib.import_module("kvrelay_worker.router.main")  # the package re-exports a function

    s = spec(
        model={"source": "/models/x", "dtype": "bfloat16"},
        router={"apiKeySecret": {"name": "k"}},
        kvTransfer={"timeoutSeconds": 7, "leaseSeconds": 45},
        decode={"drainSeconds": 300, "prefixCaching": False},
    )
    children = render(s)
    for role, drain, caching in (("prefill", 120, True), ("decode", 300, False)):
        args, unknown = entrypoint.build_parser().parse_known_args(container(children, role)["args"])
        assert unknown == [] and args.role == role and args.model == "/models/x" and args.host == "0.0.0.0"
        assert args.grpc_port == 8001 and args.metrics_port == 9090 and args.dtype == "bfloat16"
        assert args.kv_fetch_timeout_s == 7 and args.kv_lease_s == 45 and args.drain_seconds == drain
        assert args.enable_prefix_caching is caching  # on by default, off per role
    router_argv = container(children, "router")["args"]
    assert router_argv[:2] == ["--role", "router"]
    args, unknown = router_main.build_parser().parse_known_args(router_argv[2:])
    assert (
        unknown == [] and args.discovery == "kubernetes" and args.instance == "m" and args.namespace == "ns"
    )
    assert args.api_key_file == "/var/run/secrets/kvrelay/api-key"
    assert args.max_migrations == 3 and args.resume_via == "prefill" and args.prefix_weight == 1.0
    assert args.decode_prefix_weight == 2.0
    assert (int(args.max_waiting_requests), float(args.max_wait_seconds)) == (256, 60.0)
    router = {"maxMigrations": 0, "resumeVia": "decode", "prefixWeight": 0, "decodePrefixWeight": 0.5,
              "maxWaitingRequests": 8, "maxWaitSeconds": 0}  # fmt: skip
    args, _ = router_main.build_parser().parse_known_args(
        container(render(spec(router=router)), "router")["args"][2:]
    )
    assert args.max_migrations == 0 and args.resume_via == "decode" and args.prefix_weight == 0.0
    assert args.decode_prefix_weight == 0.5
    assert (args.max_waiting_requests, args.max_wait_seconds) == (8, 0.0)
    # The router takes requests (and holds them) while a pool is at zero; workers away never restart it.
    probes = container(children, "router")
    assert probes["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert probes["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert probes["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "http"}


def test_replicas_are_drift_only_when_someone_else_set_them() -> None:
    """managedFields as the API server writes them: the operator's apply, then `kubectl scale`."""
    spec_replicas = {"fieldsV1": {"f:spec": {"f:replicas": {}}}}
    ours = {"manager": resources.FIELD_MANAGER, "operation": "Apply", **spec_replicas}
    scaled = {"manager": "kubectl", "operation": "Update", "subresource": "scale", **spec_replicas}
    status = {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
              "fieldsV1": {"f:status": {"f:replicas": {}}}}  # fmt: skip

    def by_others(*entries: dict[str, Any]) -> bool:
        deployment = {"metadata": {"managedFields": list(entries)}}
        return replicas.replicas_set_by_others(deployment, resources.FIELD_MANAGER)

    assert not by_others(ours, status) and by_others(scaled, status) and not by_others()
