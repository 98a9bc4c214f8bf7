"""Pure rendering: a DisaggregatedModel spec (+ status) -> the manifests of its children.

No API calls here; handlers.py hands the result to apply.py (server-side apply). Replica counts
come from replicas.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from kvrelay_operator import api, groups
from kvrelay_operator.replicas import target_replicas, waiting_for_model_cache

APP_NAME = "kvrelay"
FIELD_MANAGER = "kvrelay-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_ROLE = f"{api.GROUP}/role"
CONFIG_HASH_ANNOTATION = f"{api.GROUP}/config-hash"
LABEL_CACHE_KEY = f"{api.GROUP}/model-cache-key"
CACHE_ROLE = "model-cache"  # the fill Job's pods; no NetworkPolicy selects them (they reach the hub)

GRPC_PORT = 8001
METRICS_PORT = 9090
MODEL_ROOT = "/models"
# Where a .gguf model source is imported (an emptyDir) before the workers and the router start.
IMPORT_ROOT = "/var/lib/kvrelay"
IMPORT_VOLUME = "imported-model"
API_KEY_DIR = "/var/run/secrets/kvrelay"
GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS_USER = 10001  # the worker image's user (worker_image/Dockerfile)
# Model loads can take many minutes (download + weights to GPU): allow up to 30 min before liveness.
STARTUP_PERIOD_S, STARTUP_FAILURES = 10, 180
# terminationGracePeriodSeconds = drainSeconds + this: after its drain deadline the worker still ends
# the streams it cut off, stops the gRPC server (2 s grace), joins the engine thread and tears down
# torch/CUDA; SIGKILL must not land in that, or clients see a reset instead of the drain status.
DRAIN_EXIT_MARGIN_S = 15
UCX_TLS_BY_TRANSPORT = {"rdma": "rc,ud,sm,self,cuda_copy,cuda_ipc,gdr_copy", "tcp": "tcp,sm,self,cuda_copy"}
# Set by the API server on every Namespace (Kubernetes 1.21+): selects one namespace by its name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# The chart's operator pod labels (charts/kvrelay/templates/_helpers.tpl, kvrelay.operatorSelectorLabels)
# less the release name, which only the chart knows (it passes the full set: OPERATOR_POD_LABELS_ENV).
DEFAULT_OPERATOR_POD_LABELS = {LABEL_NAME: "kvrelay-operator", "app.kubernetes.io/component": "operator"}
DEFAULT_METRICS_FROM = [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "monitoring"}}}]
OPERATOR_NAMESPACE_ENV = "POD_NAMESPACE"
OPERATOR_POD_LABELS_ENV = "KVRELAY_OPERATOR_POD_LABELS"
METRICS_FROM_ENV = "KVRELAY_NETWORK_POLICY_METRICS_FROM"


class NetworkPolicyConfig(BaseModel):
    """Operator-wide inputs of the models' NetworkPolicies: where the operator runs, who scrapes."""

    operator_namespace: str | None = Field(
        default=None, description="The operator's namespace; None: its pods are matched in any namespace."
    )
    operator_pod_labels: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_OPERATOR_POD_LABELS),
        min_length=1,
        description="Labels of the operator's pods (it reads each worker's /metrics before a scale-down).",
    )
    metrics_from: list[api.NetworkPeer] = Field(
        default_factory=lambda: [api.NetworkPeer.model_validate(p) for p in DEFAULT_METRICS_FROM],
        description="Peers that may scrape the workers' metrics port and the router's /metrics.",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NetworkPolicyConfig:
        """From POD_NAMESPACE and the JSON in KVRELAY_OPERATOR_POD_LABELS and
        KVRELAY_NETWORK_POLICY_METRICS_FROM (set by the chart); an unset variable keeps the default."""
        found: dict[str, Any] = {}
        if env.get(OPERATOR_NAMESPACE_ENV):
            found["operator_namespace"] = env[OPERATOR_NAMESPACE_ENV]
        if env.get(OPERATOR_POD_LABELS_ENV):
            found["operator_pod_labels"] = json.loads(env[OPERATOR_POD_LABELS_ENV])
        if env.get(METRICS_FROM_ENV):
            found["metrics_from"] = json.loads(env[METRICS_FROM_ENV]) or []  # null: none
        return cls.model_validate(found)


class RenderContext(BaseModel):
    """What rendering needs besides the spec: identity of the parent and operator settings."""

    name: str = Field(description="DisaggregatedModel name.")
    namespace: str = Field(description="Its namespace.")
    uid: str = Field(description="Its uid, for ownerReferences.")
    default_image: str = Field(description="Worker image when spec.image is unset.")
    pod_monitor_available: bool = Field(default=False, description="Prometheus Operator CRDs exist.")
    leader_worker_set_available: bool = Field(
        default=True,
        description="The cluster serves LeaderWorkerSets; without them a role spanning nodes renders no "
        "workload (status says why).",
    )
    network_policy: NetworkPolicyConfig = Field(
        default_factory=NetworkPolicyConfig, description="Operator-wide inputs of the NetworkPolicies."
    )


def child_name(name: str, role: str) -> str:
    """Name of a role's Deployment/Service/PDB."""
    return f"{name}-{role}"


def labels(name: str, role: str | None = None) -> dict[str, str]:
    """Labels every child carries (DESIGN.md); role ones also carry kvrelay.dev/role."""
    out = {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name, "app.kubernetes.io/managed-by": FIELD_MANAGER}
    if role is not None:
        out[LABEL_ROLE] = role
        out["app.kubernetes.io/component"] = role
    return out


def selector_labels(name: str, role: str) -> dict[str, str]:
    """The immutable subset used in Deployment selectors."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name, LABEL_ROLE: role}


def _owner(ctx: RenderContext) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": ctx.name,
        "uid": ctx.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(ctx: RenderContext, name: str, role: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ctx.namespace,
        "labels": labels(ctx.name, role),
        "ownerReferences": [_owner(ctx)],
    }


def served_name(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> str:
    """Model name in OpenAI requests."""
    return spec.model.served_name or ctx.name


def model_config(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> dict[str, Any]:
    """The model settings whose hash (CONFIG_HASH_ANNOTATION) rolls every role's pods on change.

    Workers and the router get these settings as flags (worker_args, router_args), not as a file:
    the annotation makes e.g. a decode batch-limit change roll the router too, so every role
    restarts on one model config.
    """
    return {
        "servedName": served_name(spec, ctx),
        "model": spec.model.model_dump(by_alias=True, exclude_none=True),
        "prefill": {"tensorParallel": spec.prefill.tensor_parallel,
                    "maxTokensPerBatch": spec.prefill.max_tokens_per_batch},
        "decode": {"tensorParallel": spec.decode.tensor_parallel,
                   "maxRunningSequences": spec.decode.max_running_sequences},
        "kvTransfer": spec.kv_transfer.model_dump(by_alias=True, exclude_none=True),
    }  # fmt: skip


@dataclass
class _ModelStorage:
    """How a pod gets its model: volumes, the main container's mounts, its --model, an init container."""

    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    model_path: str
    # The init container's name, command and volumeMounts (image, env and securityContext are added).
    init: dict[str, Any] | None = None


def cache_key(model: api.ModelSpec) -> str:
    """The model cache's directory for a source and revision: a new one is filled alongside the old."""
    return hashlib.sha256(f"{model.source}@{model.revision or ''}".encode()).hexdigest()[:12]


def cache_claim_name(name: str) -> str:
    return f"{name}-model-cache"


def _cached_key(spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus) -> str | None:
    """The cache directory pods read: the last completed fill, or the one being filled first (the
    pools are at 0 replicas meanwhile); None without a cache, or after a first fill failed."""
    if spec.model.cache is None:
        return None
    cache = status.model_cache
    if cache is not None and cache.ready_key is not None:
        return cache.ready_key
    return cache_key(spec.model) if waiting_for_model_cache(spec, status) else None


def _model_volume(
    spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus, ctx: RenderContext
) -> _ModelStorage:
    """The pod storage for the model source: the model cache claim, pvc://claim/path, an image path, or a
    Hugging Face repo id.

    A pvc or image path ending in .gguf is converted by an init container (`kvrelay import-gguf`) into
    a checkpoint directory on an emptyDir of its own, which the main container mounts read-only.
    """
    source = spec.model.source

    def model_mount() -> dict[str, Any]:
        return {"name": "model", "mountPath": MODEL_ROOT}

    if (key := _cached_key(spec, status)) is not None:
        claim = {"claimName": cache_claim_name(ctx.name), "readOnly": True}
        volume = {"name": "model", "persistentVolumeClaim": claim}
        return _ModelStorage([volume], [{**model_mount(), "readOnly": True}], f"{MODEL_ROOT}/{key}")
    if source.startswith("pvc://"):
        claim, _, path = source.removeprefix("pvc://").partition("/")
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        storage = _ModelStorage([volume], [model_mount()], f"{MODEL_ROOT}/{path}".rstrip("/"))
        # The importer reads the .gguf from the (read-only) claim.
        gguf, gguf_reader_mounts = path.endswith(".gguf"), [model_mount()]
    elif source.startswith("/"):
        # A path baked into the image (often under MODEL_ROOT): no volume may be mounted over it.
        storage = _ModelStorage([], [], source)
        gguf, gguf_reader_mounts = source.endswith(".gguf"), []
    else:  # a Hugging Face repo id, downloaded into an emptyDir
        storage = _ModelStorage([{"name": "model", "emptyDir": {}}], [model_mount()], source)
        gguf, gguf_reader_mounts = False, []
    if gguf:
        imported = f"{IMPORT_ROOT}/imported"
        storage.volumes.append({"name": IMPORT_VOLUME, "emptyDir": {}})
        storage.mounts.append({"name": IMPORT_VOLUME, "mountPath": IMPORT_ROOT, "readOnly": True})
        # --overwrite: init containers run again when the pod's sandbox is recreated, and the
        # emptyDir outlives that with the first run's checkpoint in it.
        command = ["kvrelay", "import-gguf", storage.model_path, imported, "--overwrite"]
        mounts = [*gguf_reader_mounts, {"name": IMPORT_VOLUME, "mountPath": IMPORT_ROOT}]
        storage.init = {"name": "import-gguf", "command": command, "volumeMounts": mounts}
        storage.model_path = imported
    elif not source.startswith(("pvc://", "/")):
        # A Hugging Face repo id: download once per pod before the worker starts.
        download = ["hf", "download", source, "--local-dir", f"{MODEL_ROOT}/hf"]
        if spec.model.revision:
            download += ["--revision", spec.model.revision]
        storage.init = {"name": "download-model", "command": download, "volumeMounts": [model_mount()]}
        storage.model_path = f"{MODEL_ROOT}/hf"
    # Else a checkpoint directory on the claim or in the image, read where it is.
    return storage


def _init_containers(
    spec: api.DisaggregatedModelSpec, storage: _ModelStorage, image: str, role: str
) -> list[dict[str, Any]]:
    if storage.init is None:
        return []
    return [
        {"name": storage.init["name"], "command": storage.init["command"], "image": image,
         "imagePullPolicy": spec.image_pull_policy, "env": _env([], role),
         "volumeMounts": storage.init["volumeMounts"], "securityContext": _security(False)}
    ]  # fmt: skip


def worker_args(
    spec: api.DisaggregatedModelSpec, ctx: RenderContext, role: api.WorkerRole, model_path: str
) -> list[str]:
    """kvrelay-worker flags for a worker role (wire contract section 5, as the entrypoint takes them).

    tensorParallel > 1 adds the TP flags (groups.tp_args: one process per GPU, and for a role spanning
    nodes how its ranks find each other); kvTransfer.transport maps to UCX_TLS.
    """
    kv = spec.kv_transfer
    role_spec: api.WorkerRoleSpec = getattr(spec, role)
    args = [
        "--role", role, "--model", model_path, "--served-model-name", served_name(spec, ctx),
        # Bind all interfaces: the entrypoint's default (127.0.0.1) is unreachable from other pods.
        "--host", "0.0.0.0", "--grpc-port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
        "--kv-backend", kv.backend, "--kv-port", str(kv.port), "--kv-failure-policy", kv.failure_policy,
        "--kv-lease-s", str(kv.lease_seconds), "--kv-fetch-timeout-s", str(kv.timeout_seconds),
        "--max-model-len", str(spec.model.max_model_len), "--drain-seconds", str(role_spec.drain_seconds),
    ]  # fmt: skip
    if spec.model.dtype != "auto":
        args += ["--dtype", spec.model.dtype]
    if not role_spec.prefix_caching:
        args.append("--no-enable-prefix-caching")
    if role == "prefill":
        args += ["--max-batch-tokens", str(spec.prefill.max_tokens_per_batch)]
    else:
        args += ["--max-num-seqs", str(spec.decode.max_running_sequences)]
    return args + groups.tp_args(role_spec) + list(role_spec.extra_args)


def router_args(spec: api.DisaggregatedModelSpec, ctx: RenderContext, model_path: str) -> list[str]:
    """Router flags: workers are discovered through their headless Services' EndpointSlices."""
    args = [
        "--role", "router", "--model", model_path, "--served-model-name", served_name(spec, ctx),
        "--max-model-len", str(spec.model.max_model_len),
        "--host", "0.0.0.0", "--port", str(spec.router.port),
        "--discovery", "kubernetes", "--namespace", ctx.namespace, "--instance", ctx.name,
        "--grpc-port-name", "grpc",
        "--max-migrations", str(spec.router.max_migrations), "--resume-via", spec.router.resume_via,
        "--prefix-weight", str(spec.router.prefix_weight),
        "--decode-prefix-weight", str(spec.router.decode_prefix_weight),
        "--max-waiting-requests", str(spec.router.max_waiting_requests),
        "--max-wait-seconds", str(spec.router.max_wait_seconds),
    ]  # fmt: skip
    if spec.router.api_key_secret is not None:
        args += ["--api-key-file", f"{API_KEY_DIR}/{spec.router.api_key_secret.key}"]
    return args + list(spec.router.extra_args)


def _env(extra: list[api.EnvVar], role: str) -> list[dict[str, Any]]:
    def field_ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": field_ref("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field_ref("metadata.namespace")},
        {"name": "POD_IP", "valueFrom": field_ref("status.podIP")},
        {"name": "KVRELAY_ROLE", "value": role},
        {"name": "HF_HOME", "value": f"{MODEL_ROOT}/.hf-cache"},
    ]
    return env + [{"name": e.name, "value": e.value} for e in extra]


def _kv_env(kv: api.KVTransferSpec) -> list[dict[str, Any]]:
    env = []
    if kv.backend == "nixl" and kv.transport in UCX_TLS_BY_TRANSPORT:
        env.append({"name": "UCX_TLS", "value": UCX_TLS_BY_TRANSPORT[kv.transport]})
    if kv.backend == "nixl" and kv.transport == "rdma" and kv.rdma.net_devices:
        env.append({"name": "UCX_NET_DEVICES", "value": kv.rdma.net_devices})
    return env


def _security(rdma: bool) -> dict[str, Any]:
    # IPC_LOCK lets UCX pin (mlock) registered memory beyond RLIMIT_MEMLOCK, which a pod spec
    # cannot raise; it is the only capability we keep.
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    if rdma:
        capabilities["add"] = ["IPC_LOCK"]
    return {"allowPrivilegeEscalation": False, "capabilities": capabilities, "readOnlyRootFilesystem": False}


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _affinity(
    ctx: RenderContext, role: str, user: dict[str, Any] | None, one_per_node: bool = False
) -> dict[str, Any]:
    """User affinity, plus a preferred spread of the role's replicas over nodes unless user set one.

    one_per_node (a role spanning nodes): the role's pods on distinct nodes, required, whatever the
    user set. Each takes gpusPerNode GPUs, a whole node of the pool, so this forbids nothing the GPU
    request allows, and keeps two ranks of a group off one node that has more GPUs than that.
    """
    affinity = dict(user or {})
    if one_per_node:
        anti = dict(affinity.get("podAntiAffinity") or {})
        required = list(anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
        required.append({"labelSelector": {"matchLabels": selector_labels(ctx.name, role)},
                         "topologyKey": "kubernetes.io/hostname"})  # fmt: skip
        affinity["podAntiAffinity"] = {**anti, "requiredDuringSchedulingIgnoredDuringExecution": required}
        return affinity
    if "podAntiAffinity" not in affinity:
        affinity["podAntiAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": selector_labels(ctx.name, role)},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    return affinity


def _topology_spread(ctx: RenderContext, role: str) -> list[dict[str, Any]]:
    return [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(ctx.name, role)},
        }
    ]


def _resources(user: api.ResourceRequirements, extra: dict[str, int]) -> dict[str, Any]:
    requests = {**user.requests, **{k: str(v) for k, v in extra.items()}}
    limits = {**user.limits, **{k: str(v) for k, v in extra.items()}}
    return {
        k: {n: str(q) for n, q in v.items()} for k, v in (("requests", requests), ("limits", limits)) if v
    }


def _probes(ready: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Startup allows a 30-minute model load; readiness gates traffic; liveness restarts a dead process."""

    def probe(action: dict[str, Any], period: int, failures: int, timeout: int) -> dict[str, Any]:
        return {**action, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": timeout}

    return {
        "startupProbe": probe(ready, STARTUP_PERIOD_S, STARTUP_FAILURES, 5),
        "readinessProbe": probe(ready, 5, 3, 5),
        "livenessProbe": probe(live, 15, 4, 10),
    }


def _worker_probes() -> dict[str, Any]:
    # /ready answers 200 only once the model is loaded and until the worker starts draining (503
    # from its first SIGTERM on), so a draining worker leaves the router's endpoints. Liveness is
    # /metrics, which keeps answering while draining: a drain must never look like a hang.
    ready = {"httpGet": {"path": "/ready", "port": "metrics"}}
    return _probes(ready, {"httpGet": {"path": "/metrics", "port": "metrics"}})


def _router_probes() -> dict[str, Any]:
    # /ready answers 200 once every role has a ready worker, or at once while the router holds requests
    # for one (a role scaled to zero must not take the router out of its Service). Liveness is /metrics:
    # workers being away is no reason to restart the router.
    return _probes(
        {"httpGet": {"path": "/ready", "port": "http"}}, {"httpGet": {"path": "/metrics", "port": "http"}}
    )


def _deployment(
    ctx: RenderContext, role: str, replicas: int, pod_spec: dict[str, Any], config_hash: str, gpu: bool
) -> dict[str, Any]:
    # GPU roles replace pods one at a time without surge: GPUs are scarce and a surge pod would
    # often be unschedulable. The router is cheap and surges.
    strategy = {"maxSurge": 0, "maxUnavailable": 1} if gpu else {"maxSurge": 1, "maxUnavailable": 0}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ctx, child_name(ctx.name, role), role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(ctx.name, role)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": strategy},
            "template": {
                "metadata": {
                    "labels": labels(ctx.name, role),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": pod_spec,
            },
        },
    }


def _worker_deployment(
    spec: api.DisaggregatedModelSpec,
    status: api.DisaggregatedModelStatus,
    ctx: RenderContext,
    role: api.WorkerRole,
    config_hash: str,
) -> dict[str, Any]:
    role_spec: api.WorkerRoleSpec = getattr(spec, role)
    kv = spec.kv_transfer
    rdma = kv.backend == "nixl" and kv.transport == "rdma"
    storage = _model_volume(spec, status, ctx)
    image = spec.image or ctx.default_image
    spans = groups.spans_nodes(role_spec)
    extra_resources = {GPU_RESOURCE: groups.gpus_per_pod(role_spec)}
    if rdma:
        extra_resources[kv.rdma.resource_name] = kv.rdma.count
    mounts = [*storage.mounts, {"name": "dshm", "mountPath": "/dev/shm"}]
    workload_name = child_name(ctx.name, role)
    lws_env = [
        {"name": groups.LWS_NAME_ENV, "value": groups.set_name(workload_name)},
        groups.tp_secret_env(ctx.name, ctx.uid),  # leader and workers share the one pod template
    ] if spans else []  # fmt: skip
    container = {
        "name": role,
        "image": image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["kvrelay-worker"],
        "args": worker_args(spec, ctx, role, storage.model_path),
        "env": _env(role_spec.env, role) + _kv_env(kv) + lws_env,
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "kv", "containerPort": kv.port, "protocol": "TCP"},
            *([{"name": "tp", "containerPort": groups.TP_PORT, "protocol": "TCP"}] if spans else []),
        ],
        "resources": _resources(role_spec.resources, extra_resources),
        "volumeMounts": mounts,
        "securityContext": _security(rdma),
        **_worker_probes(),
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "securityContext": _pod_security(),
        "affinity": _affinity(ctx, role, role_spec.affinity, one_per_node=spans),
        "topologySpreadConstraints": _topology_spread(ctx, role),
        # No preStop hook: the worker drains on SIGTERM itself. The pod leaves its EndpointSlices
        # when it gets its deletionTimestamp, and a request that still arrives meanwhile is refused
        # with UNAVAILABLE "draining: ..." (the router retries it elsewhere), not dropped, so a
        # preStop sleep would only delay the drain.
        "terminationGracePeriodSeconds": role_spec.drain_seconds + DRAIN_EXIT_MARGIN_S,
        "volumes": [
            *storage.volumes,
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": role_spec.shm_size}},
        ],
    }
    if init_containers := _init_containers(spec, storage, image, role):
        pod["initContainers"] = init_containers
    if role_spec.node_selector:
        pod["nodeSelector"] = dict(role_spec.node_selector)
    if role_spec.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in role_spec.tolerations]
    deployment = _deployment(ctx, role, target_replicas(spec, status, role), pod, config_hash, gpu=True)
    return groups.leader_worker_set(deployment, role_spec) if spans else deployment


def _router_deployment(
    spec: api.DisaggregatedModelSpec,
    status: api.DisaggregatedModelStatus,
    ctx: RenderContext,
    config_hash: str,
) -> dict[str, Any]:
    router = spec.router
    # The router reads the tokenizer and config.json from --model, so it gets the same model storage.
    storage = _model_volume(spec, status, ctx)
    image = spec.image or ctx.default_image
    mounts = list(storage.mounts)
    volumes = list(storage.volumes)
    if router.api_key_secret is not None:
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
        volumes.append({"name": "api-key", "secret": {"secretName": router.api_key_secret.name}})
    container = {
        "name": "router",
        "image": image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["kvrelay-worker"],
        "args": router_args(spec, ctx, storage.model_path),
        "env": _env(router.env, "router"),
        # The router serves /metrics on its HTTP port.
        "ports": [{"name": "http", "containerPort": router.port, "protocol": "TCP"}],
        "resources": _resources(router.resources, {}),
        "volumeMounts": mounts,
        "securityContext": _security(False),
        **_router_probes(),
    }
    pod: dict[str, Any] = {
        "serviceAccountName": child_name(ctx.name, "router"),
        "containers": [container],
        "securityContext": _pod_security(),
        "affinity": _affinity(ctx, "router", None),
        "volumes": volumes,
    }
    if init_containers := _init_containers(spec, storage, image, "router"):
        pod["initContainers"] = init_containers
    if router.node_selector:
        pod["nodeSelector"] = dict(router.node_selector)
    if router.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in router.tolerations]
    return _deployment(ctx, "router", target_replicas(spec, status, "router"), pod, config_hash, gpu=False)


def _worker_service(
    ctx: RenderContext, role: str, kv_port: int, leaders_only: bool = False
) -> dict[str, Any]:
    # Headless: the router discovers individual workers through EndpointSlices, not a VIP.
    selector = selector_labels(ctx.name, role)
    if leaders_only:
        # A group serves gRPC from its leader (rank 0) alone; LWS labels the leader template itself
        # (no webhook needed) with worker-index "0", so the router never sees the other ranks.
        selector[groups.WORKER_INDEX_LABEL] = "0"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ctx, child_name(ctx.name, role), role),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector,
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
                {"name": "kv", "port": kv_port, "targetPort": "kv", "protocol": "TCP"},
            ],
        },
    }


def _router_service(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ctx, child_name(ctx.name, "router"), "router"),
        "spec": {
            "type": spec.router.service_type,
            "selector": selector_labels(ctx.name, "router"),
            "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _pdb(ctx: RenderContext, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(ctx, child_name(ctx.name, role), role),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(ctx.name, role)}},
    }


def _router_rbac(ctx: RenderContext) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding so the router can watch the workers' EndpointSlices."""
    name = child_name(ctx.name, "router")
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(ctx, name, "router")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(ctx, name, "router"),
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(ctx, name, "router"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ctx.namespace}],
        },
    ]


def _pod_monitor(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(ctx, ctx.name, None),
        "spec": {
            "selector": {"matchLabels": {LABEL_NAME: APP_NAME, LABEL_INSTANCE: ctx.name}},
            # Workers expose `metrics`, the router `http`; each pod matches only the port it has.
            "podMetricsEndpoints": [
                {"port": port, "path": "/metrics", "interval": spec.monitoring.interval}
                for port in ("metrics", "http")
            ],
        },
    }


# ---------------------------------------------------------------- NetworkPolicies (spec.networkPolicy)
# Ingress only. Restricting egress as well would cut DNS, model downloads (Hugging Face) and the
# router's API server watch unless each got its own rule. Kubelet probes come from the node, which
# the common CNIs (Calico, Cilium) let through to its own pods whatever the policies say.


def _tcp(port: int | None = None) -> dict[str, Any]:
    """A NetworkPolicy port entry; without a port number it opens every TCP port."""
    return {"protocol": "TCP"} if port is None else {"protocol": "TCP", "port": port}


def _own_pods(ctx: RenderContext, role: str) -> dict[str, Any]:
    """The model's own pods of one role; no namespaceSelector: in the policy's (the model's) namespace."""
    return {"podSelector": {"matchLabels": selector_labels(ctx.name, role)}}


def operator_peer(config: NetworkPolicyConfig) -> dict[str, Any]:
    """The operator's pods: in its namespace when known, else in any namespace."""
    namespaces = (
        {"matchLabels": {NAMESPACE_NAME_LABEL: config.operator_namespace}}
        if config.operator_namespace
        else {}
    )
    return {"namespaceSelector": namespaces, "podSelector": {"matchLabels": dict(config.operator_pod_labels)}}


def _peers(peers: list[api.NetworkPeer]) -> list[dict[str, Any]]:
    return [p.model_dump(by_alias=True, exclude_none=True) for p in peers]


def _network_policy(ctx: RenderContext, role: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(ctx, child_name(ctx.name, role), role),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ctx.name, role)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def _worker_network_policy(
    spec: api.DisaggregatedModelSpec, ctx: RenderContext, role: api.WorkerRole
) -> dict[str, Any]:
    """gRPC from the model's router; all TCP from the other worker role; metrics from the operator
    and the monitoring peers; for a role spanning nodes, all TCP among its own pods."""
    other = "decode" if role == "prefill" else "prefill"
    config = ctx.network_policy
    # The ranks of a group meet at the leader's tp port, then torch.distributed (gloo, NCCL over TCP
    # sockets) opens connections between every pair of ranks on ports chosen at run time.
    ranks = (
        [{"from": [_own_pods(ctx, role)], "ports": [_tcp()]}]
        if groups.spans_nodes(getattr(spec, role))
        else []
    )
    return _network_policy(ctx, role, [*ranks,
        {"from": [_own_pods(ctx, "router")], "ports": [_tcp(GRPC_PORT)]},
        # Both ways between the model's prefill and decode pods: the decode pod dials the prefill
        # pod's KV control port (spec.kvTransfer.port), and NIXL/UCX over TCP then opens connections
        # on ephemeral ports chosen at run time, in either direction, which no port list can name.
        {"from": [_own_pods(ctx, other)], "ports": [_tcp()]},
        # The operator reads each worker's /metrics before a scale-down (pod_load.py) on this port.
        {"from": [operator_peer(config), *_peers(config.metrics_from)], "ports": [_tcp(METRICS_PORT)]},
    ])  # fmt: skip


def _router_network_policy(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> dict[str, Any]:
    """The router's port from anywhere (the public API, guarded by the API key) or from routerFrom."""
    rule: dict[str, Any] = {"ports": [_tcp(spec.router.port)]}
    if spec.network_policy.router_from is not None:
        # The router serves /metrics on the same port: the monitoring peers keep it.
        rule["from"] = _peers(spec.network_policy.router_from) + _peers(ctx.network_policy.metrics_from)
    # A rule without `from` admits every source.
    return _network_policy(ctx, "router", [rule])


def network_policies(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> list[dict[str, Any]]:
    """One NetworkPolicy per role, or none when spec.networkPolicy.enabled is false."""
    if not spec.network_policy.enabled:
        return []
    return [
        *(_worker_network_policy(spec, ctx, r) for r in api.WORKER_ROLES),
        _router_network_policy(spec, ctx),
    ]


def wants_pod_monitor(spec: api.DisaggregatedModelSpec, available: bool) -> bool:
    """auto follows the presence of the Prometheus Operator CRDs; enabled/disabled force it."""
    mode = spec.monitoring.pod_monitor
    return mode == "enabled" or (mode == "auto" and available)


def router_endpoint(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> str:
    """In-cluster base URL of the OpenAI API."""
    return f"http://{child_name(ctx.name, 'router')}.{ctx.namespace}.svc:{spec.router.port}/v1"


def model_config_hash(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> str:
    """Short content hash of model_config, the pod-template annotation CONFIG_HASH_ANNOTATION."""
    config_json = json.dumps(model_config(spec, ctx), sort_keys=True)
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def model_cache_children(spec: api.DisaggregatedModelSpec, ctx: RenderContext) -> list[dict[str, Any]]:
    """spec.model.cache: the ReadWriteMany claim and the Job that downloads the checkpoint into it.

    The Job writes into the directory of the source's cache key and is named after a hash of its whole
    template (a Job's template is immutable): a new image or revision makes a new Job, which the pruning
    of stale children replaces the old one with. `hf download` skips files already there.
    """
    cache = spec.model.cache
    if cache is None:
        return []
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": str(cache.size)}},
    }
    if cache.storage_class_name:
        claim_spec["storageClassName"] = cache.storage_class_name
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(ctx, cache_claim_name(ctx.name), None),
        "spec": claim_spec,
    }
    key = cache_key(spec.model)
    download = ["hf", "download", spec.model.source, "--local-dir", f"{MODEL_ROOT}/{key}"]
    if spec.model.revision:
        download += ["--revision", spec.model.revision]
    image = spec.image or ctx.default_image
    pod = {
        "restartPolicy": "OnFailure",
        "securityContext": _pod_security(),
        "containers": [
            {"name": "fill", "image": image, "imagePullPolicy": spec.image_pull_policy, "command": download,
             "env": _env([], CACHE_ROLE), "volumeMounts": [{"name": "model", "mountPath": MODEL_ROOT}],
             "securityContext": _security(False)}
        ],
        "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": cache_claim_name(ctx.name)}}],
    }  # fmt: skip
    template = {"metadata": {"labels": {**labels(ctx.name, CACHE_ROLE), LABEL_CACHE_KEY: key}}, "spec": pod}
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:6]
    meta = _meta(ctx, f"{ctx.name}-c{digest}", CACHE_ROLE)  # as long as the -prefill suffix: fits 63
    meta["labels"][LABEL_CACHE_KEY] = key
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {"backoffLimit": 4, "template": template},
    }
    return [claim, job]


def tp_link_secret(spec: api.DisaggregatedModelSpec, ctx: RenderContext, token: str) -> dict[str, Any] | None:
    """The Secret holding the shared key of the model's multi-pod TP groups, or None when no worker
    role spans nodes. Created once, never applied: a new key per reconcile would cut running groups'
    links (handlers.reconcile creates it and keeps one that exists); immutable, so nothing rewrites it."""
    if not any(groups.spans_nodes(getattr(spec, role)) for role in api.WORKER_ROLES):
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(ctx, groups.tp_secret_name(ctx.name, ctx.uid), None),
        "type": "Opaque",
        "immutable": True,
        "stringData": {groups.TP_SECRET_KEY: token},
    }


def render_children(
    spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus, ctx: RenderContext
) -> list[dict[str, Any]]:
    """Every child manifest of one DisaggregatedModel, in apply order."""
    config_hash = model_config_hash(spec, ctx)
    # Policies first: a new model's pods are never created before the policies that select them.
    children: list[dict[str, Any]] = network_policies(spec, ctx)
    children += model_cache_children(spec, ctx)
    for role in api.WORKER_ROLES:
        spans = groups.spans_nodes(getattr(spec, role))
        children.append(_worker_service(ctx, role, spec.kv_transfer.port, leaders_only=spans))
        if not spans or ctx.leader_worker_set_available:
            children.append(_worker_deployment(spec, status, ctx, role, config_hash))
        # PDB over pods: at most one pod, so one group, down at a time by voluntary disruption.
        children.append(_pdb(ctx, role))
    children += _router_rbac(ctx)
    children.append(_router_service(spec, ctx))
    children.append(_router_deployment(spec, status, ctx, config_hash))
    children.append(_pdb(ctx, "router"))
    if wants_pod_monitor(spec, ctx.pod_monitor_available):
        children.append(_pod_monitor(spec, ctx))
    return children
