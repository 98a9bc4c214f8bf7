"""Pydantic models of the DisaggregatedModel custom resource: the one hand-written source of its shape.

crd.py renders the CRD's OpenAPI schema from these models; resources.py renders children from them.
Field names are camelCase on the wire (aliases) and snake_case in Python.

Per-role autoscaling bounds are `spec.prefill.minReplicas/maxReplicas` and
`spec.decode.minReplicas/maxReplicas` (reused, not repeated under `spec.autoscaling`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from kvrelay_operator import formats

GROUP = "kvrelay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DisaggregatedModel"
PLURAL = "disaggregatedmodels"
SINGULAR = "disaggregatedmodel"
SHORT_NAMES = ["dm", "dmodel"]

WorkerRole = Literal["prefill", "decode"]
Role = Literal["prefill", "decode", "router"]
WORKER_ROLES: tuple[WorkerRole, ...] = ("prefill", "decode")
ROLES: tuple[Role, ...] = ("prefill", "decode", "router")

# A Kubernetes quantity: users write both `cpu: 4` and `memory: 16Gi`.
Quantity = Annotated[
    Annotated[int, Field(ge=0)] | Annotated[str, StringConstraints(pattern=formats.QUANTITY, max_length=64)],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
ResourceName = Annotated[str, StringConstraints(pattern=formats.RESOURCE_NAME, max_length=253)]
LabelKey = Annotated[str, StringConstraints(pattern=formats.LABEL_KEY, max_length=317)]
LabelValue = Annotated[str, StringConstraints(pattern=formats.LABEL_VALUE, max_length=63)]


def cel(*rules: tuple[str, str] | tuple[str, str, str]) -> ConfigDict:
    """Model config that puts CEL rules (rule, message[, messageExpression]) on the model's schema
    wherever it is used; a messageExpression lets the API server's refusal name the values."""
    checks: list[dict[str, str]] = []
    for rule, message, *expression in rules:
        check = {"rule": rule, "message": message}
        if expression:
            check["messageExpression"] = expression[0]
        checks.append(check)
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": checks})


def _is_device(resource: str) -> bool:
    return resource.endswith("/gpu") or resource.startswith("rdma/")


# The same rule in CEL: GPUs and RDMA devices come from tensorParallel and kvTransfer.rdma.
_NO_DEVICES = "!(k.endsWith('/gpu') || k.startsWith('rdma/'))"


class CRModel(BaseModel):
    """Base: camelCase aliases, unknown fields refused, population by either name."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )


# ---------------------------------------------------------------- spec: model


class ModelCache(CRModel):
    """A shared volume the operator fills once with the checkpoint (a Job), mounted read-only by every pod."""

    size: Quantity = Field(description="Capacity of the cache claim (the checkpoint plus headroom).")
    storage_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=formats.DNS_SUBDOMAIN,
        description="StorageClass of the claim; it must offer ReadWriteMany (pods of every pool on any "
        "node mount it). Default: the cluster's default class.",
    )


_CACHE_NEEDS_A_REPO = (
    "model.cache applies to Hugging Face sources: a pvc:// or image path is already read in place; "
    "remove cache or use a repo id"
)


class ModelSpec(CRModel):
    """Which checkpoint to serve and how."""

    model_config = cel(
        ("!has(self.cache) || !(self.source.startsWith('pvc://') || self.source.startsWith('/'))",
         _CACHE_NEEDS_A_REPO),
    )  # fmt: skip

    source: str = Field(
        min_length=1,
        max_length=512,
        pattern=formats.MODEL_SOURCE,
        description="Checkpoint: a Hugging Face repo id (org/name), pvc://<claim>/<path> (claim: a "
        "PersistentVolumeClaim name; path: inside it, may be empty, no `..`), "
        "or an absolute path inside the worker image. A pvc or image path ending in .gguf "
        "(a llama.cpp GGUF file) is converted by an init container (kvrelay import-gguf) "
        "into a checkpoint on an emptyDir before the workers and the router start.",
    )
    revision: str | None = Field(
        default=None, max_length=128, description="Hugging Face revision (branch, tag or commit)."
    )
    served_name: str | None = Field(
        default=None,
        max_length=253,
        description="Model name clients pass in OpenAI requests; defaults to the resource's name.",
    )
    max_model_len: int = Field(
        default=4096, ge=16, le=1048576, description="Longest prompt plus completion, in tokens."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights and KV cache dtype; auto takes the checkpoint's."
    )
    cache: ModelCache | None = Field(
        default=None,
        description="Download the checkpoint once into a ReadWriteMany PersistentVolumeClaim (a Job) that "
        "every worker and the router mount read-only, instead of once per pod. Pools start when the "
        "first fill completes; a new source or revision is filled alongside while pods keep serving "
        "the last complete one. If the fill fails, pods fall back to downloading it themselves.",
    )

    @model_validator(mode="after")
    def _cache_needs_a_repo(self) -> ModelSpec:
        if self.cache is not None and self.source.startswith(("pvc://", "/")):
            raise ValueError(_CACHE_NEEDS_A_REPO)
        return self


# ---------------------------------------------------------------- spec: pod plumbing


class ResourceRequirements(CRModel):
    """Container resources; GPUs come from tensorParallel and RDMA devices from kvTransfer.rdma, so
    neither may be set here."""

    # has(): an omitted map is absent, not empty, when the rule runs (the CRD's default is {}).
    model_config = cel(
        (f"(!has(self.requests) || self.requests.all(k, {_NO_DEVICES})) && "
         f"(!has(self.limits) || self.limits.all(k, {_NO_DEVICES}))",
         "GPUs come from tensorParallel and RDMA devices from kvTransfer.rdma: remove */gpu and rdma/* "
         "from resources"),
        ("!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || "
         "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
         "each resource request must be <= its limit"),
    )  # fmt: skip

    requests: dict[ResourceName, Quantity] = Field(
        default_factory=dict, max_length=32, description="Resource requests (cpu, memory, ...)."
    )
    limits: dict[ResourceName, Quantity] = Field(
        default_factory=dict, max_length=32, description="Resource limits (cpu, memory, ...)."
    )

    @model_validator(mode="after")
    def _no_devices_and_requests_within_limits(self) -> ResourceRequirements:
        devices = sorted(k for k in {*self.requests, *self.limits} if _is_device(k))
        if devices:
            raise ValueError(
                f"{', '.join(devices)} in resources: GPUs come from tensorParallel and RDMA devices "
                "from kvTransfer.rdma"
            )
        value = formats.quantity_value
        for name, request in self.requests.items():
            if name in self.limits and value(request) > value(self.limits[name]):
                raise ValueError(f"{name} request {request} is above its limit {self.limits[name]}")
        return self


class Toleration(CRModel):
    """A pod toleration, as in core/v1 (and refused where core/v1 would refuse the pod)."""

    model_config = cel(
        ("has(self.key) && self.key != '' || self.operator == 'Exists'",
         "a toleration without a key must use operator Exists"),
        ("self.operator != 'Exists' || !has(self.value) || self.value == ''",
         "a toleration with operator Exists takes no value"),
        ("!has(self.tolerationSeconds) || has(self.effect) && self.effect == 'NoExecute'",
         "tolerationSeconds needs effect NoExecute"),
    )  # fmt: skip

    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty matches all."
    )
    toleration_seconds: int | None = Field(default=None, description="How long NoExecute is tolerated.")

    @model_validator(mode="after")
    def _as_core_v1_requires(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class EnvVar(CRModel):
    """A literal environment variable."""

    name: str = Field(
        min_length=1, max_length=253, pattern=formats.ENV_NAME, description="Variable name (no '=')."
    )
    value: str = Field(default="", description="Variable value.")


MAX_TENSOR_PARALLEL = 64
_TP_FITS_NODES = (
    "tensorParallel must be at most gpusPerNode (one pod) or a multiple of it (a group of "
    "tensorParallel / gpusPerNode pods on as many nodes)"
)


class WorkerRoleSpec(CRModel):
    """A pool of GPU workers of one role."""

    model_config = cel(
        ("self.tensorParallel <= self.gpusPerNode || self.tensorParallel % self.gpusPerNode == 0",
         _TP_FITS_NODES,
         # format(), not string() and +: the API server bounds the cost of the one, not of the other.
         f"'tensorParallel (%d) with gpusPerNode (%d): {_TP_FITS_NODES}'"
         ".format([self.tensorParallel, self.gpusPerNode])"),
    )  # fmt: skip

    replicas: int = Field(
        default=1,
        ge=0,
        le=512,
        description="Replicas, unless autoscaling.mode is auto: then the autoscaler's desiredReplicas "
        "(within min/max).",
    )
    min_replicas: int = Field(default=1, ge=0, le=512, description="Lower bound for the autoscaler.")
    max_replicas: int = Field(default=8, ge=1, le=512, description="Upper bound for the autoscaler.")
    tensor_parallel: int = Field(
        default=1,
        ge=1,
        le=MAX_TENSOR_PARALLEL,
        description="GPUs per replica (tensor parallel degree), one worker process per GPU. Up to "
        "gpusPerNode: one pod (a Deployment's replica). Above it: a multiple of gpusPerNode, and the role "
        "becomes a LeaderWorkerSet whose groups of tensorParallel / gpusPerNode pods, one per node, "
        "each hold one replica (needs LeaderWorkerSet v0.7+ installed). The worker refuses a degree "
        "that does not divide the model's attention and KV heads.",
    )
    gpus_per_node: int = Field(
        default=8,
        ge=1,
        le=64,
        description="GPUs each node of this role's pool offers: a replica needing more spans nodes.",
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="CPU/memory; GPUs come from tensorParallel."
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Node pool placement: node labels this role's pods need.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for this role's node pool taints."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="core/v1 Affinity; when it has no podAntiAffinity the operator adds a "
        "preferred spread of replicas across nodes.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    shm_size: str = Field(
        default="8Gi", pattern=formats.BINARY_SIZE, description="Size of the memory-backed /dev/shm."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    extra_args: list[str] = Field(default_factory=list, description="Extra kvrelay-worker arguments.")
    prefix_caching: bool = Field(
        default=True,
        description="Keep the KV of full prompt blocks after a request ends and reuse it for later requests "
        "with the same prefix (shared system prompts, multi-turn chat); least recently used blocks are "
        "evicted when memory runs short. Off: every prompt is computed from scratch.",
    )
    drain_seconds: int = Field(
        default=120,
        ge=5,
        le=3600,
        description="How long a worker drains when its pod is stopped (scale-down, rollout, eviction): it "
        "admits nothing new, finishes running requests and keeps serving the prompt KV it holds until "
        "decode workers have read it, then exits. Requests still running at the end are migrated by the "
        "router to another worker, so this need not cover the longest generation. The pod's "
        "terminationGracePeriodSeconds is this plus a small margin.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> WorkerRoleSpec:
        tp, per_node = self.tensor_parallel, self.gpus_per_node
        if tp > per_node and tp % per_node:
            raise ValueError(f"tensorParallel ({tp}) with gpusPerNode ({per_node}): {_TP_FITS_NODES}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas})"
            )
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) must lie within [minReplicas, maxReplicas] "
                f"= [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class PrefillSpec(WorkerRoleSpec):
    """Prefill workers: compute-bound, small batches."""

    max_tokens_per_batch: int = Field(
        default=8192, ge=16, le=1048576, description="Most prompt tokens in one prefill batch."
    )


class DecodeSpec(WorkerRoleSpec):
    """Decode workers: memory-bound, large continuous batches."""

    max_running_sequences: int = Field(
        default=256, ge=1, le=65536, description="Most sequences decoding at once per replica."
    )


class SecretKeyRef(CRModel):
    """A key in a Secret of the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=formats.DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field(
        default="api-key",
        min_length=1,
        max_length=253,
        pattern=formats.CONFIG_KEY,
        description="Key in the Secret.",
    )


class RouterSpec(CRModel):
    """The OpenAI-compatible front end."""

    replicas: int = Field(default=1, ge=0, le=128, description="Router replicas.")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Type of the router's Service."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Service port of the OpenAI API.")
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="When set, clients must send this Secret's value as a bearer token."
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Router CPU/memory."
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Router node placement."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Router tolerations.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    extra_args: list[str] = Field(default_factory=list, description="Extra router arguments.")
    max_migrations: int = Field(
        default=3,
        ge=0,
        le=10,
        description="Times one stream may resume on another decode worker after losing its own; then it "
        "ends with an error. 0 turns migration off.",
    )
    resume_via: Literal["prefill", "decode"] = Field(
        default="prefill",
        description="Who recomputes a resumed stream's KV: a prefill worker, relayed to the new decode "
        "worker (default; keeps the decode batch running), or the new decode worker itself.",
    )
    max_waiting_requests: int = Field(
        default=256,
        ge=0,
        le=100000,
        description="Scale to zero: requests the router holds at once while prefill or decode has no ready "
        "replica (a role scaled to zero, or its pods still starting); one more gets a 503 "
        "no_ready_replicas with Retry-After.",
    )
    max_wait_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="Scale to zero: how long the router holds a request for a ready replica of each role it "
        "needs before a 503 no_ready_replicas with Retry-After; set it above the time a replica takes to "
        "start (the autoscaler sees held requests and scales a role at zero up). 0: no holding, a 503 at "
        "once.",
    )
    prefix_weight: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Prefix-aware prefill routing: a prompt goes to the prefill worker with the fewest "
        "queued prompt tokens minus this weight times the prompt tokens that worker likely holds in its "
        "prefix cache (each router's own record of what it sent where). 0 routes by queued tokens only.",
    )
    decode_prefix_weight: float = Field(
        default=2.0,
        ge=0,
        le=100,
        description="Prefix-aware decode routing: a stream goes to the decode worker with the fewest running "
        "streams minus this weight times the share of its prompt that worker likely holds (it then fetches "
        "only the rest over the KV relay): a worker holding the whole prompt counts as running this many "
        "fewer streams. Each router's own record of what it sent where. 0 routes by running streams only.",
    )


# ---------------------------------------------------------------- spec: KV transfer


class RDMASpec(CRModel):
    """RDMA device plugin resource the workers request when transport is rdma."""

    resource_name: str = Field(
        default="rdma/ib",
        min_length=1,
        max_length=253,
        pattern=formats.EXTENDED_RESOURCE_NAME,
        description="Extended resource name of the RDMA device plugin (domain/name).",
    )
    count: int = Field(default=1, ge=1, le=16, description="RDMA devices per worker pod.")
    net_devices: str | None = Field(
        default=None, description="UCX_NET_DEVICES value, e.g. mlx5_0:1; unset lets UCX choose."
    )


class KVTransferSpec(CRModel):
    """How prefill workers hand their KV cache to decode workers."""

    backend: Literal["nixl", "tcp"] = Field(default="nixl", description="nixl (UCX) or plain tcp.")
    transport: Literal["auto", "rdma", "tcp"] = Field(
        default="auto", description="UCX transport hint: auto lets UCX choose; rdma requests RDMA devices."
    )
    rdma: RDMASpec = Field(default_factory=RDMASpec, description="RDMA devices (used when transport=rdma).")
    port: int = Field(default=5600, ge=1024, le=65535, description="Worker KV control port.")
    lease_seconds: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="How long a prefill worker holds KV blocks for a reader; longer than timeoutSeconds, "
        "or a transfer still within its deadline finds its blocks freed.",
    )
    timeout_seconds: int = Field(
        default=10, ge=1, le=600, description="Per-transfer timeout (< leaseSeconds)."
    )
    failure_policy: Literal["recompute", "fail"] = Field(
        default="recompute", description="On a failed transfer: recompute the prompt on decode, or fail."
    )

    @model_validator(mode="after")
    def _rdma_needs_nixl(self) -> KVTransferSpec:
        if self.transport == "rdma" and self.backend != "nixl":
            raise ValueError("transport rdma needs backend nixl")
        if self.lease_seconds <= self.timeout_seconds:
            raise ValueError(
                f"leaseSeconds ({self.lease_seconds}) must be > timeoutSeconds ({self.timeout_seconds}): "
                "the prefill worker must hold the KV until the transfer's deadline has passed"
            )
        return self


# ---------------------------------------------------------------- spec: autoscaling


class SLOSpec(CRModel):
    """Latency targets at a quantile."""

    ttft_seconds: float = Field(default=1.0, gt=0, le=600, description="Time-to-first-token target.")
    itl_seconds: float = Field(default=0.05, gt=0, le=60, description="Inter-token latency target.")
    quantile: float = Field(default=0.9, ge=0.5, le=0.999, description="Quantile the targets apply to.")


class RatioSpec(CRModel):
    """Bounds of the prefill:decode replica ratio."""

    min: float = Field(default=0.1, gt=0, le=100, description="Lowest prefill:decode ratio.")
    max: float = Field(default=10.0, gt=0, le=100, description="Highest prefill:decode ratio.")

    @model_validator(mode="after")
    def _ordered(self) -> RatioSpec:
        if self.min > self.max:
            raise ValueError(f"ratio.min ({self.min}) must be <= ratio.max ({self.max})")
        return self


class ProfileSpec(CRModel):
    """Optional measured per-replica throughput to seed the autoscaler."""

    prefill_tokens_per_second: float | None = Field(
        default=None, gt=0, description="Prompt tokens/s one prefill replica sustains."
    )
    decode_tokens_per_second: float | None = Field(
        default=None, gt=0, description="Generated tokens/s one decode replica sustains."
    )


class AutoscalingSpec(CRModel):
    """SLO autoscaling of the prefill and decode pools (bounds: spec.<role>.min/maxReplicas)."""

    mode: Literal["auto", "advisory", "off"] = Field(
        default="off", description="auto scales; advisory only records decisions in status; off does nothing."
    )
    slo: SLOSpec = Field(default_factory=SLOSpec, description="Latency targets.")
    ratio: RatioSpec = Field(default_factory=RatioSpec, description="prefill:decode ratio bounds.")
    gpu_budget: int | None = Field(
        default=None, ge=1, le=100000, description="Most GPUs prefill and decode may use together."
    )
    interval_seconds: int = Field(
        default=30,
        ge=5,
        le=3600,
        description="Seconds between decisions. Between them the prefill queue is read every 10 s, and a "
        "queue the ready pool would drain no sooner than the TTFT SLO adds prefill replicas at once.",
    )
    scale_up_cooldown_seconds: int | None = Field(
        default=None,
        ge=0,
        le=86400,
        description="Wait after a scale up before the next one; unset: 30 s, or intervalSeconds if longer. "
        "0, or at least intervalSeconds: a decision is made only every intervalSeconds, so a shorter wait "
        "would have no effect.",
    )
    scale_down_cooldown_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description="Wait after any scale before scaling down (lengthened while a pool flaps, so it acts "
        "even when shorter than intervalSeconds).",
    )
    prometheus_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=formats.HTTP_URL,
        description="Prometheus base URL (http or https); defaults to the operator's --prometheus-url.",
    )
    profile: ProfileSpec = Field(default_factory=ProfileSpec, description="Per-replica throughput seeds.")

    @model_validator(mode="after")
    def _cooldown_spans_an_interval(self) -> AutoscalingSpec:
        value = self.scale_up_cooldown_seconds
        if value is not None and 0 < value < self.interval_seconds:
            raise ValueError(
                f"scaleUpCooldownSeconds ({value}) is shorter than intervalSeconds "
                f"({self.interval_seconds}), so it would have no effect: set it to 0, to at least "
                "intervalSeconds, or leave it unset"
            )
        return self

    def scale_up_cooldown(self) -> int:
        """The scale-up cooldown in effect: the one set, else 30 s or one interval if longer (loading
        replicas are counted as coming, so a second step up within a start asks only for what is new)."""
        if self.scale_up_cooldown_seconds is not None:
            return self.scale_up_cooldown_seconds
        return max(30, self.interval_seconds)


class MonitoringSpec(CRModel):
    """Prometheus scraping of the workers and router."""

    pod_monitor: Literal["auto", "enabled", "disabled"] = Field(
        default="auto", description="auto renders a PodMonitor when the Prometheus Operator CRDs exist."
    )
    interval: str = Field(default="15s", pattern=formats.DURATION, description="Scrape interval.")


# ---------------------------------------------------------------- spec: network policy


class LabelSelectorRequirement(CRModel):
    """One matchExpressions entry of a label selector, as in meta/v1."""

    model_config = cel(
        ("self.operator in ['In', 'NotIn'] ? has(self.values) && self.values.size() > 0 : "
         "!has(self.values) || self.values.size() == 0",
         "operators In and NotIn need values; Exists and DoesNotExist take none"),
    )  # fmt: skip

    key: LabelKey = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="How the key is matched.")
    values: list[LabelValue] | None = Field(
        default=None, max_length=64, description="Values for In and NotIn."
    )

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError("operators In and NotIn need values; Exists and DoesNotExist take none")
        return self


class LabelSelector(CRModel):
    """A meta/v1 label selector; empty selects everything."""

    match_labels: dict[LabelKey, LabelValue] | None = Field(
        default=None, max_length=64, description="Labels the object must carry."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=16, description="Label requirements, all of which must hold."
    )


class IPBlock(CRModel):
    """A range of IP addresses (for sources outside the cluster's pods)."""

    cidr: str = Field(max_length=64, pattern=formats.CIDR, description="The range, e.g. 10.0.0.0/8.")
    except_: list[Annotated[str, StringConstraints(max_length=64, pattern=formats.CIDR)]] | None = Field(
        default=None, alias="except", max_length=16, description="Ranges within cidr to leave out."
    )


class NetworkPeer(CRModel):
    """A NetworkPolicy peer as in networking/v1: pods (podSelector in this namespace, namespaceSelector
    for whole namespaces, both for pods in those namespaces) or an ipBlock."""

    model_config = cel(
        ("has(self.ipBlock) ? !has(self.podSelector) && !has(self.namespaceSelector) : "
         "has(self.podSelector) || has(self.namespaceSelector)",
         "a peer is an ipBlock, or a podSelector and/or a namespaceSelector"),
    )  # fmt: skip

    pod_selector: LabelSelector | None = Field(default=None, description="Pods, by label.")
    namespace_selector: LabelSelector | None = Field(default=None, description="Namespaces, by label.")
    ip_block: IPBlock | None = Field(default=None, description="IP addresses.")

    @model_validator(mode="after")
    def _one_kind(self) -> NetworkPeer:
        selectors = self.pod_selector is not None or self.namespace_selector is not None
        if (self.ip_block is not None) == selectors:
            raise ValueError("a peer is an ipBlock, or a podSelector and/or a namespaceSelector")
        return self


class NetworkPolicySpec(CRModel):
    """NetworkPolicies around the model's pods (ingress only)."""

    enabled: bool = Field(
        default=True,
        description="Render one NetworkPolicy per role. Worker gRPC: from the model's own router pods only. "
        "Between the model's own prefill and decode pods: every TCP port (the KV control port, and the "
        "ephemeral ports NIXL/UCX over TCP uses). Worker metrics port: from the operator and the "
        "monitoring peers the chart names. Router port: from anywhere, or routerFrom. Egress is not "
        "restricted. Only a CNI that implements NetworkPolicy (Calico, Cilium, ...) enforces them, and "
        "RDMA verbs, CMA and shared memory bypass the CNI. false: no policies (existing ones are deleted).",
    )
    router_from: list[NetworkPeer] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Who may reach the router's port (the OpenAI API, guarded by the API key, and its "
        "/metrics); unset: anyone. The chart's monitoring peers keep access to /metrics either way.",
    )


class DisaggregatedModelSpec(CRModel):
    """Spec of a DisaggregatedModel: one model served by prefill and decode pools and a router."""

    model: ModelSpec = Field(description="The checkpoint to serve.")
    image: str | None = Field(
        default=None,
        max_length=512,
        pattern=formats.IMAGE,
        description="Worker image ([registry[:port]/]repository[:tag][@digest]); defaults to the operator's "
        "--worker-image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Pull policy of the worker image."
    )
    prefill: PrefillSpec = Field(default_factory=PrefillSpec, description="Prefill worker pool.")
    decode: DecodeSpec = Field(default_factory=DecodeSpec, description="Decode worker pool.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="OpenAI-compatible router.")
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec, description="KV cache relay.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="SLO autoscaler.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Metrics scraping.")
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, description="NetworkPolicies around the model's pods."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> DisaggregatedModelSpec:
        # Any prefill TP -> decode TP pairing is accepted: each decode rank reads the KV heads it needs
        # from whichever prefill ranks hold them. Whether a degree divides the model's heads is only
        # known from the checkpoint, so the worker checks that when it loads the model.
        budget = self.autoscaling.gpu_budget
        if budget is not None and budget < min_gpus(self):
            raise ValueError(
                f"autoscaling.gpuBudget ({budget}) must cover the minimum replicas' GPUs ({min_gpus(self)})"
            )
        return self


def min_gpus(spec: DisaggregatedModelSpec) -> int:
    """GPUs the prefill and decode pools use at their minimum replica counts."""
    return (
        spec.prefill.min_replicas * spec.prefill.tensor_parallel
        + spec.decode.min_replicas * spec.decode.tensor_parallel
    )


# ---------------------------------------------------------------- cross-field rules as CEL
# Each tuple: (schema path of the object the rule sits on, rule, message, fieldPath).
# The pydantic validators above enforce the same rules in Python.

_ROLE_RULES = [
    ("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas", ".minReplicas"),
    (
        "self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas",
        "replicas must lie within [minReplicas, maxReplicas]",
        ".replicas",
    ),
]
CEL_RULES: list[tuple[str, str, str, str | None]] = [
    *[("prefill", r, m, f) for r, m, f in _ROLE_RULES],
    *[("decode", r, m, f) for r, m, f in _ROLE_RULES],
    (
        "kvTransfer",
        "self.transport != 'rdma' || self.backend == 'nixl'",
        "transport rdma needs backend nixl",
        ".transport",
    ),
    ("autoscaling.ratio", "self.min <= self.max", "ratio.min must be <= ratio.max", ".min"),
    (
        "kvTransfer",
        "self.leaseSeconds > self.timeoutSeconds",
        "leaseSeconds must be > timeoutSeconds: the prefill worker must hold the KV until the transfer's "
        "deadline has passed",
        ".leaseSeconds",
    ),
    (
        "autoscaling",
        "!has(self.scaleUpCooldownSeconds) || self.scaleUpCooldownSeconds == 0 || "
        "self.scaleUpCooldownSeconds >= self.intervalSeconds",
        "scaleUpCooldownSeconds shorter than intervalSeconds has no effect: set it to 0, to at least "
        "intervalSeconds, or leave it unset",
        ".scaleUpCooldownSeconds",
    ),
    (
        "",
        "!has(self.autoscaling.gpuBudget) || self.autoscaling.gpuBudget >= "
        "self.prefill.minReplicas * self.prefill.tensorParallel "
        "+ self.decode.minReplicas * self.decode.tensorParallel",
        "autoscaling.gpuBudget must cover prefill and decode minReplicas x tensorParallel GPUs",
        ".autoscaling.gpuBudget",
    ),
]


# Rules on the whole object (the only place CEL sees metadata.name).
_MAX_NAME = formats.MAX_NAME_LENGTH
ROOT_CEL_RULES: list[tuple[str, str]] = [
    (
        f"self.metadata.name.size() <= {_MAX_NAME} && self.metadata.name.matches('{formats.NAME}')",
        f"metadata.name must be a DNS-1035 label of at most {_MAX_NAME} characters (a lowercase letter "
        f"first, then letters, digits or '-'): its Services are named <name>{formats.LONGEST_CHILD_SUFFIX} "
        "and the like, and a Service name is at most 63 characters",
    ),
]


def name_problem(name: str) -> str | None:
    """Why a DisaggregatedModel may not have this name (the root CEL rule, in Python), or None."""
    if len(name) <= formats.MAX_NAME_LENGTH and re.fullmatch(formats.NAME, name):
        return None
    return ROOT_CEL_RULES[0][1]


# ---------------------------------------------------------------- status


class StatusModel(CRModel):
    """Base of status models: unknown fields are ignored when reading, since others may write status."""

    model_config = ConfigDict(extra="ignore")


class Condition(StatusModel):
    """A standard Kubernetes condition."""

    type: str = Field(
        description="Ready, Progressing, Degraded, PodsScheduled, ScalingLimited or DriftCorrected."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time of the last change.")
    observed_generation: int | None = Field(default=None, description="Generation the condition is about.")


class RoleStatus(StatusModel):
    """Replica counts of one role."""

    replicas: int = Field(default=0, description="Pods of the role's Deployment.")
    ready_replicas: int = Field(default=0, description="Ready pods.")
    desired_replicas: int | None = Field(
        default=None,
        description="Target replicas. Mode auto: written only by the autoscaler (unset until its first "
        "decision), applied by the reconciler clamped to min/max. Otherwise: the replicas applied.",
    )


MAX_REVERSALS = 64  # the newest kept; the policy counts those of the last hour against a budget of 2


class AutoscalerRoleState(StatusModel):
    """What the autoscaler remembers about one role (times: unix seconds)."""

    capacity_tokens_per_second: float | None = Field(
        default=None, gt=0, description="Learned tokens/s one replica serves (unset: the profile seed)."
    )
    capacity_basis: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[0-9a-f]*$",
        description="Fingerprint of the model, tensorParallel, batch limits and profile the capacity was "
        "learned under; a spec that changes any of them starts again from the profile seed.",
    )
    last_change_at: float | None = Field(default=None, description="When it last changed the replicas.")
    last_up_at: float | None = Field(default=None, description="When it last scaled up.")
    last_direction: Literal["up", "down", "none"] = Field(default="none", description="Its last move.")
    num_reversals: int = Field(default=0, ge=0, description="Moves that went against the one before.")
    damping: float = Field(
        default=1.0, ge=1.0, le=64.0, description="Flap damping: stretches the scale-down window, cooldown."
    )
    last_reversal_at: float | None = Field(default=None, description="When damping last doubled or decayed.")
    reversal_times: list[float] = Field(
        default_factory=list,
        max_length=MAX_REVERSALS,
        description="When it turned direction within the reversal window (the reversal budget counts these).",
    )
    steady_need_at_up: int | None = Field(
        default=None, ge=0, description="Replicas the load without its backlog needed at the last scale-up."
    )


MAX_DEMAND_SAMPLES = 400  # the policy keeps 1,800 s of history: 361 samples at the 5 s minimum interval


class DemandHistoryState(StatusModel):
    """Demand seen at past decisions, one column per value: sample i was seen at start + offsetsSeconds[i]."""

    model_config = cel(
        (
            "self.offsetsSeconds.size() == self.prefillTokensPerSecond.size() && "
            "self.offsetsSeconds.size() == self.decodeTokensPerSecond.size()",
            "offsetsSeconds, prefillTokensPerSecond and decodeTokensPerSecond must have the same length",
        )
    )

    start: float = Field(description="Unix time of the first sample.")
    offsets_seconds: list[float] = Field(
        max_length=MAX_DEMAND_SAMPLES, description="Seconds from start to each sample."
    )
    prefill_tokens_per_second: list[float] = Field(
        max_length=MAX_DEMAND_SAMPLES, description="Prompt tokens/s offered at each sample."
    )
    decode_tokens_per_second: list[float] = Field(
        max_length=MAX_DEMAND_SAMPLES, description="Generated tokens/s demanded at each sample."
    )

    @model_validator(mode="after")
    def _same_length(self) -> DemandHistoryState:
        columns = (self.offsets_seconds, self.prefill_tokens_per_second, self.decode_tokens_per_second)
        if len({len(column) for column in columns}) > 1:
            raise ValueError(
                "offsetsSeconds, prefillTokensPerSecond and decodeTokensPerSecond must have the same length"
            )
        return self


class AutoscalerState(StatusModel):
    """The autoscaler's learned state, read back by an operator that restarts or takes over the lead.

    Written with the decisions (on a material change or a heartbeat), so it may be a few minutes
    older than the running operator's memory. The start of the current run of metrics is left out on
    purpose: after any restart, scale-down waits for a fresh window of metrics.
    """

    prefill: AutoscalerRoleState = Field(default_factory=AutoscalerRoleState, description="Prefill role.")
    decode: AutoscalerRoleState = Field(default_factory=AutoscalerRoleState, description="Decode role.")
    demand_history: DemandHistoryState | None = Field(
        default=None, description="Demand over the longest window the policy looks back (surge, trend)."
    )
    mean_output_tokens: float | None = Field(default=None, ge=0, description="Learned tokens per request.")
    last_metrics_at: float | None = Field(
        default=None, description="Unix time of the last decision with usable metrics."
    )
    last_queued_prefill_tokens: float | None = Field(
        default=None, ge=0, description="Prompt tokens queued then (queue growth is measured from it)."
    )
    last_waiting_requests: float | None = Field(default=None, ge=0, description="Requests waiting then.")
    last_prefill_ready: int | None = Field(default=None, ge=0, description="Ready prefill replicas then.")
    last_load_at: float | None = Field(
        default=None, description="Unix time of the last decision that saw any load (scale to zero)."
    )


class AutoscalerStatus(StatusModel):
    """The autoscaler's last decision written, and what it has learned."""

    last_decision_time: str | None = Field(
        default=None,
        description="RFC 3339 time of the last decision written. Decisions are written when they change "
        "something (replicas, reason code, hold, learned state) and otherwise every 5 minutes at least.",
    )
    prefill_replicas: int | None = Field(default=None, description="Prefill replicas it decided.")
    decode_replicas: int | None = Field(default=None, description="Decode replicas it decided.")
    reason: str = Field(default="", description="Why, in words.")
    inputs: dict[str, float] = Field(default_factory=dict, description="Metric values the decision used.")
    state: AutoscalerState | None = Field(
        default=None, description="What it learned (capacity, damping, demand): a restart goes on from it."
    )


class ModelCacheStatus(StatusModel):
    """Where the model cache stands: the checkpoint the spec asks for, and the last one filled."""

    key: str = Field(description="Cache key of the spec's source and revision (a directory on the claim).")
    phase: Literal["Filling", "Ready", "Failed"] = Field(description="The fill Job of `key`.")
    ready_key: str | None = Field(
        default=None, description="The last key whose fill completed: what the pods mount and serve."
    )
    message: str | None = Field(default=None, description="Why the fill failed (the Job's own message).")


class DisaggregatedModelStatus(StatusModel):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(default=None, description="Last spec generation reconciled.")
    phase: Literal["Pending", "Progressing", "Ready", "Degraded"] | None = Field(
        default=None, description="Summary of the conditions."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Current conditions.")
    prefill: RoleStatus | None = Field(default=None, description="Prefill pool replicas.")
    decode: RoleStatus | None = Field(default=None, description="Decode pool replicas.")
    router: RoleStatus | None = Field(default=None, description="Router replicas.")
    router_endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI API.")
    autoscaler: AutoscalerStatus | None = Field(default=None, description="Last autoscaler decision.")
    model_cache: ModelCacheStatus | None = Field(default=None, description="spec.model.cache's fill state.")
