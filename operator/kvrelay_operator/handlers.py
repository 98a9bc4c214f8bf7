"""kopf handlers for DisaggregatedModel: thin glue between watch events, resources.py and kube.py.

What triggers what:
- create/update/resume of a DisaggregatedModel -> `reconcile`: render every child
  (resources.py), apply those whose content changed (apply.py: server-side apply, skipped when
  the applied hash matches, also after a restart), then patch status (status.py). A spec edit
  that lowers a worker pool's replicas first marks its victims, as the autoscaler's scale-downs do.
- any event of a child Deployment -> `on_deployment_event`: a replica count changed by hand is
  put back (Warning Event `ReplicasRestored` + condition `DriftCorrected`); a deleted child is
  re-applied; the Deployments' status is mirrored into the parent's status.
- any event of a child's pod -> `on_pod_event`: a pod the scheduler cannot place (and one placed
  after all) changes condition `PodsScheduled` and the Ready message, in the scheduler's words.
- any event of a DisaggregatedModel, status changes included -> `on_model_event`: when a worker
  Deployment's replicas differ from `replicas.target_replicas(spec, status)` it is re-applied.
  This is the autoscaler hook: in mode auto the autoscaler's kopf timer only patches
  `status.<role>.desiredReplicas` and `status.autoscaler`; the resulting watch event makes this
  handler apply the new replicas (clamped to min/max). The autoscaler never writes Deployments.
  Before a scale-down it marks the role's pods with `controller.kubernetes.io/pod-deletion-cost`
  (victims.py, from each worker's /metrics: pod_load.py) so the ReplicaSet controller removes the
  least-loaded pods; failing to mark them is logged and counted, never a reason not to scale.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter
from pydantic import BaseModel, Field, ValidationError

from kvrelay_operator import api, groups, resources
from kvrelay_operator.apply import ApplyError, ChildApplier
from kvrelay_operator.kube import PROMETHEUS_OPERATOR_GROUP_VERSION, KubeClient
from kvrelay_operator.pod_load import DEFAULT_URL_TEMPLATE, PodLoadReader
from kvrelay_operator.replicas import replicas_set_by_others, target_replicas
from kvrelay_operator.status import (
    DeploymentState,
    PodScheduling,
    cache_status_for_spec,
    cache_status_from_job,
    compute_status,
    condition_events,
    container_errors_by_role,
    incomplete_groups_by_role,
    ready_groups_by_role,
    set_condition,
    status_merge_patch,
    unschedulable_by_role,
    unschedulable_message,
    with_model_cache,
)
from kvrelay_operator.victims import DELETION_COST, WorkerPod, plan_deletion_costs

log = logging.getLogger(__name__)
DEFAULT_WORKER_IMAGE = "ghcr.io/kvrelay/kvrelay-worker:0.1.0"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
CHILD_LABELS = {resources.LABEL_NAME: resources.APP_NAME, resources.LABEL_ROLE: kopf.PRESENT}
VICTIM_ERRORS = Counter(
    "kvrelay_scale_down_victim_errors",
    "Failures while marking a shrinking pool's pods with deletion costs (the scale-down went ahead).",
    ["model", "role", "step"],
)


class OperatorConfig(BaseModel):
    """Operator-wide settings (from the environment, set by main.py flags)."""

    default_image: str = Field(
        default=DEFAULT_WORKER_IMAGE, description="Worker image if spec.image is unset."
    )
    prometheus_url: str | None = Field(default=None, description="Default Prometheus for the autoscaler.")
    monitoring_check_seconds: float = Field(
        default=300.0, description="How often to re-detect PodMonitor CRDs."
    )
    pod_metrics_url: str = Field(
        default=DEFAULT_URL_TEMPLATE,
        description="URL of a worker pod's /metrics; fields {ip}, {port}, {pod}, {namespace}.",
    )
    pod_metrics_timeout_seconds: float = Field(
        default=1.0, gt=0, description="Timeout of each /metrics read before a scale-down."
    )
    deletion_cost_settle_seconds: float = Field(
        default=2.0,
        ge=0,
        description="Pause between marking pods with deletion costs and lowering replicas (see handlers).",
    )
    network_policy: resources.NetworkPolicyConfig = Field(
        default_factory=resources.NetworkPolicyConfig,
        description="Who the models' NetworkPolicies let in besides their own pods (the operator, scrapers).",
    )

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """Reads KVRELAY_WORKER_IMAGE, KVRELAY_PROMETHEUS_URL, KVRELAY_POD_METRICS_URL, the network
        policy settings (resources.NetworkPolicyConfig.from_env) and, for slow clusters,
        KVRELAY_POD_METRICS_TIMEOUT_SECONDS and KVRELAY_DELETION_COST_SETTLE_SECONDS."""
        timings = {
            field: float(os.environ[env])
            for field, env in (
                ("pod_metrics_timeout_seconds", "KVRELAY_POD_METRICS_TIMEOUT_SECONDS"),
                ("deletion_cost_settle_seconds", "KVRELAY_DELETION_COST_SETTLE_SECONDS"),
            )
            if os.environ.get(env)
        }
        return cls(
            default_image=os.environ.get("KVRELAY_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
            prometheus_url=os.environ.get("KVRELAY_PROMETHEUS_URL") or None,
            pod_metrics_url=os.environ.get("KVRELAY_POD_METRICS_URL") or DEFAULT_URL_TEMPLATE,
            network_policy=resources.NetworkPolicyConfig.from_env(os.environ),
            **timings,
        )


class OperatorState:
    """Shared by all handlers through kopf's memo (per-object memos are shallow copies)."""

    def __init__(self, kube: KubeClient, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self.applier = ChildApplier(kube)
        self.pod_loads = PodLoadReader(config.pod_metrics_url, config.pod_metrics_timeout_seconds)
        self._monitoring: tuple[float, bool] | None = None
        self._lws: tuple[float, bool] | None = None

    def pod_monitor_available(self) -> bool:
        """Whether the Prometheus Operator's API is served (cached for a few minutes)."""
        now = time.monotonic()
        if self._monitoring is None or now - self._monitoring[0] > self.config.monitoring_check_seconds:
            self._monitoring = (now, self.kube.group_version_served(PROMETHEUS_OPERATOR_GROUP_VERSION))
        return self._monitoring[1]

    def leader_worker_set_available(self) -> bool:
        """Whether LeaderWorkerSets are served (cached like the PodMonitor check; always re-checked
        while absent, so a model waiting for them starts soon after they are installed)."""
        now = time.monotonic()
        if self._lws is None or not self._lws[1] or now - self._lws[0] > self.config.monitoring_check_seconds:
            self._lws = (now, self.kube.group_version_served(groups.API_VERSION))
        return self._lws[1]


def _state(memo: kopf.Memo) -> OperatorState:
    return memo["kvrelay"]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class UnreadableSpec(ValueError):
    """A spec the API server accepted and this operator cannot read: the CRD is newer than the
    operator (a field it does not know), or older than the rules it checks."""


def _parse(
    spec: dict[str, Any], status: dict[str, Any]
) -> tuple[api.DisaggregatedModelSpec, api.DisaggregatedModelStatus]:
    try:
        parsed = api.DisaggregatedModelSpec.model_validate(dict(spec))
    except ValidationError as exc:
        problems = "; ".join(
            f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise UnreadableSpec(
            f"this operator cannot read the spec ({problems}); the API server accepted it, so the CRD "
            "and the operator are different versions: upgrade the operator (or roll the CRD back)"
        ) from exc
    return parsed, api.DisaggregatedModelStatus.model_validate(dict(status or {}))


def _ctx(
    state: OperatorState, name: str, namespace: str, uid: str, monitoring: bool, lws: bool = True
) -> resources.RenderContext:
    return resources.RenderContext(
        name=name, namespace=namespace, uid=uid, default_image=state.config.default_image,
        pod_monitor_available=monitoring, network_policy=state.config.network_policy,
        leader_worker_set_available=lws,
    )  # fmt: skip


def _deployment_states(
    deployments_index: kopf.Index, namespace: str, name: str, lws_index: kopf.Index | None = None
) -> dict[str, DeploymentState]:
    """role -> the state of its workload: a Deployment, or a LeaderWorkerSet for a role spanning nodes."""
    store = [*deployments_index.get((namespace, name), []), *(lws_index or {}).get((namespace, name), [])]
    return {role: DeploymentState.model_validate(state) for role, state in store}


@kopf.index(groups.GROUP, groups.VERSION, groups.PLURAL, labels=CHILD_LABELS)
def leader_worker_sets_by_model(namespace: str, meta: kopf.Meta, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """(namespace, model name) -> (role, DeploymentState) of its child LeaderWorkerSets. Where the
    cluster serves none, kopf watches nothing here and the index stays empty."""
    state = DeploymentState.from_leader_worker_set(dict(body))
    return {(namespace, meta["labels"][resources.LABEL_INSTANCE]): (meta["labels"][resources.LABEL_ROLE],
                                                                     state.model_dump())}  # fmt: skip


@kopf.index("apps", "v1", "deployments", labels=CHILD_LABELS)
def deployments_by_model(namespace: str, meta: kopf.Meta, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """(namespace, model name) -> (role, DeploymentState) of its child Deployments."""
    state = DeploymentState.from_body(dict(body))
    return {(namespace, meta["labels"][resources.LABEL_INSTANCE]): (meta["labels"][resources.LABEL_ROLE],
                                                                     state.model_dump())}  # fmt: skip


def _unschedulable(pods_by_model: kopf.Index, namespace: str, name: str) -> dict[str, str]:
    store = pods_by_model.get((namespace, name), [])
    return unschedulable_by_role([PodScheduling.model_validate(pod) for pod in store])


_STUCK_IN_MESSAGE = re.compile(r"\d+ pods? failing: ")  # as container_errors_by_role words it


def _container_errors(pods_by_model: kopf.Index, namespace: str, name: str) -> dict[str, str]:
    store = pods_by_model.get((namespace, name), [])
    return container_errors_by_role([PodScheduling.model_validate(pod) for pod in store])


def _incomplete(
    spec: api.DisaggregatedModelSpec, pods_by_model: kopf.Index, namespace: str, name: str
) -> dict[str, str]:
    store = pods_by_model.get((namespace, name), [])
    return incomplete_groups_by_role(spec, [PodScheduling.model_validate(pod) for pod in store])


def _ready_groups(
    spec: api.DisaggregatedModelSpec, pods_by_model: kopf.Index, namespace: str, name: str
) -> dict[str, int]:
    store = pods_by_model.get((namespace, name), [])
    return ready_groups_by_role(spec, [PodScheduling.model_validate(pod) for pod in store])


@kopf.index("", "v1", "pods", labels=CHILD_LABELS)
def pods_by_model(meta: kopf.Meta, body: kopf.Body, namespace: str, **_: Any) -> dict[Any, Any]:
    """(namespace, model name) -> PodScheduling of each of its pods (for the scheduler's reasons)."""
    labels = meta.get("labels") or {}
    pod = PodScheduling.from_body(dict(body), labels[resources.LABEL_ROLE])
    return {(namespace, labels.get(resources.LABEL_INSTANCE)): pod.model_dump()}


@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
def models_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """(namespace, name) -> the DisaggregatedModel's body (for handlers of its children)."""
    return {(namespace, name): dict(body)}


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod, the service account at the kubelet's KUBERNETES_SERVICE_HOST/PORT; else KUBECONFIG
    as it is now (not at import time)."""
    # Not kopf.login_with_service_account: it dials https://kubernetes.default.svc, which needs
    # cluster DNS and port 443; the address in the environment is what every official client uses,
    # and the one our KubeClient (kubernetes.config.load_incluster_config) uses too.
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(SERVICE_ACCOUNT_TOKEN):
        return kopf.login_via_client(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Annotations-only bookkeeping (status stays ours), Warning+ log events, one API client."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    # kopf needs a finalizer on models with a timer (the autoscaler); name it after us.
    settings.persistence.finalizer = f"{api.GROUP}/operator"
    settings.posting.level = logging.WARNING
    if "kvrelay" not in memo:
        memo["kvrelay"] = OperatorState(KubeClient.from_environment(), OperatorConfig.from_env())


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
def reconcile(
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str,
    uid: str,
    body: kopf.Body,
    meta: kopf.Meta,
    memo: kopf.Memo,
    reason: str,
    deployments_by_model: kopf.Index,
    leader_worker_sets_by_model: kopf.Index,
    pods_by_model: kopf.Index,
    **_: Any,
) -> None:
    """Render -> apply changed children -> patch status."""
    state = _state(memo)
    try:
        parsed_spec, parsed_status = _parse(dict(spec), dict(status))
    except UnreadableSpec as exc:
        _write_status(state, dict(body), _degraded("SpecNotUnderstood", str(exc), meta.get("generation")))
        raise kopf.PermanentError(str(exc)) from exc  # this generation can never apply; a new one can
    try:
        monitoring = state.pod_monitor_available()
        lws = not _needs_lws(parsed_spec) or state.leader_worker_set_available()
    except ApiException as exc:
        raise _retry_soon("checking for the PodMonitor and LeaderWorkerSet APIs", exc) from exc
    ctx = _ctx(state, name, namespace, uid, monitoring, lws)
    children = resources.render_children(parsed_spec, parsed_status, ctx)
    # A spec edit that lowers replicas picks its victims the way the autoscaler's scale-downs do.
    states = _deployment_states(deployments_by_model, namespace, name, leader_worker_sets_by_model)
    scaled_down = _mark_spec_scale_downs(state, namespace, name, parsed_spec, parsed_status, states)
    try:
        _maybe_create_tp_secret(state, parsed_spec, ctx)  # before the pods that read it
        changed = state.applier.apply_changed(namespace, name, children, fresh=reason == "create")
    except ApplyError as exc:
        if exc.namespace_terminating:
            # Nothing can be created there any more, and the model goes with the namespace: a retry
            # would only keep kopf from handling the deletion (and releasing its finalizer).
            log.info("%s/%s: namespace is being deleted; not reconciling", namespace, name)
            return
        if exc.refused:  # the API refuses the child itself: retrying cannot help
            # The Degraded condition's Warning Event (reason ApplyRefused) comes with the status write.
            message = f"a child was refused by the API server ({exc.status}): {exc.detail}"[:1000]
            _write_status(state, dict(body), _degraded("ApplyRefused", message, meta.get("generation")))
            raise kopf.PermanentError(message) from exc
        raise kopf.TemporaryError(f"applying children failed: {exc.status} {exc.reason}", delay=5) from exc
    log.info("%s/%s generation %s (%s): applied %d of %d children%s", namespace, name, meta.get("generation"),
             reason, len(changed), len(children), f": {', '.join(changed)}" if changed else "")  # fmt: skip
    if changed:
        verb = "Created" if reason == "create" else "Updated"
        kopf.event(
            body, type="Normal", reason=verb, message=f"applied {len(changed)} children: {', '.join(changed)}"
        )
    for message in scaled_down:
        kopf.event(body, type="Normal", reason="Scaled", message=message[:1000])
    generation = meta.get("generation") or 0
    applied = {
        response["metadata"]["labels"][resources.LABEL_ROLE]: DeploymentState.from_workload(response)
        for response in changed.values()
        if response.get("kind") in ("Deployment", groups.KIND)
    }
    endpoint = resources.router_endpoint(parsed_spec, ctx)

    def reconciled(parent: dict[str, Any]) -> api.DisaggregatedModelStatus:
        # The spec and generation handled here, over whatever status the model has now: a condition
        # the mirror wrote meanwhile (DriftCorrected) is kept. A newer spec gets its own reconcile.
        # The Deployments as the index has them now (read again on every attempt, as the mirror does),
        # except one just applied that the index has not seen yet: then the apply response.
        deployments = _deployment_states(deployments_by_model, namespace, name, leader_worker_sets_by_model)
        for role, response in applied.items():
            if role not in deployments or deployments[role].generation < response.generation:
                deployments[role] = response
        return compute_status(parsed_spec, _parse_status(parent), deployments, generation, endpoint, _now(),
                              observed_generation=generation,
                              unschedulable=_unschedulable(pods_by_model, namespace, name),
                              container_errors=_container_errors(pods_by_model, namespace, name),
                              incomplete_groups=_incomplete(parsed_spec, pods_by_model, namespace, name),
                              ready_groups=_ready_groups(parsed_spec, pods_by_model, namespace, name),
                              leader_worker_set_available=lws)  # fmt: skip

    # Not kopf's end-of-handler patch: that one is unconditional, computed from the status this
    # handler started with, and replaces the whole conditions list.
    try:
        written = _write_status(state, dict(body), reconciled)
    except ApiException as exc:
        raise _retry_soon("writing status", exc) from exc
    if not written:
        raise kopf.TemporaryError("the model's status kept changing while it was written", delay=1)


def _maybe_create_tp_secret(
    state: OperatorState, spec: api.DisaggregatedModelSpec, ctx: resources.RenderContext
) -> None:
    """Creates the model's TP link Secret where a role spans nodes (resources.tp_link_secret); one that
    exists (409) is kept as it is, never read or rewritten. Other failures raise ApplyError."""
    manifest = resources.tp_link_secret(spec, ctx, secrets.token_hex(32))
    if manifest is None:
        return
    try:
        state.kube.create(manifest, ctx.namespace)
    except ApiException as exc:
        if exc.status != 409:
            raise ApplyError.from_api(exc) from exc
        return
    log.info("%s/%s: created Secret %s", ctx.namespace, ctx.name, manifest["metadata"]["name"])


def _needs_lws(spec: api.DisaggregatedModelSpec) -> bool:
    return any(groups.spans_nodes(getattr(spec, role)) for role in api.WORKER_ROLES)


def _retry_soon(what: str, exc: ApiException) -> kopf.TemporaryError:
    """A failed API call (the API server restarting, etcd unavailable: status 0 or 5xx) is retried
    in 5 s, like a failed apply; raised as is, kopf would log a traceback and wait 60 s."""
    return kopf.TemporaryError(f"{what} failed: {exc.status} {exc.reason}", delay=5)


def _parent_for(
    models_by_name: kopf.Index, namespace: str, instance: str, owner_uid: str | None
) -> dict[str, Any] | None:
    parent = next(iter(models_by_name.get((namespace, instance), [])), None)
    if (
        parent is None
        or parent["metadata"].get("uid") != owner_uid
        or parent["metadata"].get("deletionTimestamp")
    ):
        return None
    return parent


def _owner_uid(meta: kopf.Meta) -> str | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("controller"):
            return ref.get("uid")
    return None


def _workload_kind(spec: api.DisaggregatedModelSpec, role: str) -> str:
    """The kind a role renders as: LeaderWorkerSet for a worker role spanning nodes, else Deployment."""
    spans = role in api.WORKER_ROLES and groups.spans_nodes(getattr(spec, role))
    return groups.KIND if spans else "Deployment"


def _apply_deployment(state: OperatorState, parent: dict[str, Any], role: str) -> dict[str, Any] | None:
    """Re-renders and applies one role's workload (Deployment or LeaderWorkerSet) of a parent; None
    when it renders none (a LeaderWorkerSet the cluster does not serve)."""
    meta = parent["metadata"]
    spec, status = _parse(parent.get("spec") or {}, parent.get("status") or {})
    lws = _workload_kind(spec, role) != groups.KIND or state.leader_worker_set_available()
    ctx = _ctx(state, meta["name"], meta["namespace"], meta["uid"], False, lws)
    kinds = ("Deployment", groups.KIND)
    wanted = next(
        (c for c in resources.render_children(spec, status, ctx)
         if c["kind"] in kinds and c["metadata"]["labels"][resources.LABEL_ROLE] == role),
        None,
    )  # fmt: skip
    return None if wanted is None else state.applier.apply_one(meta["namespace"], meta["name"], wanted)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
def on_deployment_event(
    event: kopf.RawEvent,
    namespace: str,
    meta: kopf.Meta,
    body: kopf.Body,
    memo: kopf.Memo,
    models_by_name: kopf.Index,
    deployments_by_model: kopf.Index,
    leader_worker_sets_by_model: kopf.Index,
    pods_by_model: kopf.Index,
    **_: Any,
) -> None:
    """Restores hand-edited replicas, re-creates deleted Deployments, mirrors status into the parent."""
    _on_workload_event("Deployment", event, namespace, meta, body, memo, models_by_name,
                       (deployments_by_model, leader_worker_sets_by_model), pods_by_model)  # fmt: skip


@kopf.on.event(groups.GROUP, groups.VERSION, groups.PLURAL, labels=CHILD_LABELS)
def on_leader_worker_set_event(
    event: kopf.RawEvent,
    namespace: str,
    meta: kopf.Meta,
    body: kopf.Body,
    memo: kopf.Memo,
    models_by_name: kopf.Index,
    deployments_by_model: kopf.Index,
    leader_worker_sets_by_model: kopf.Index,
    pods_by_model: kopf.Index,
    **_: Any,
) -> None:
    """The same for a role spanning nodes: its LeaderWorkerSet's groups (watched only where served)."""
    _on_workload_event(groups.KIND, event, namespace, meta, body, memo, models_by_name,
                       (deployments_by_model, leader_worker_sets_by_model), pods_by_model)  # fmt: skip


WorkloadIndexes = tuple[kopf.Index, kopf.Index]  # (deployments_by_model, leader_worker_sets_by_model)


def _on_workload_event(
    kind: str,
    event: kopf.RawEvent,
    namespace: str,
    meta: kopf.Meta,
    body: kopf.Body,
    memo: kopf.Memo,
    models_by_name: kopf.Index,
    workloads: WorkloadIndexes,
    pods_by_model: kopf.Index,
) -> None:
    state = _state(memo)
    instance, role = meta["labels"][resources.LABEL_INSTANCE], meta["labels"][resources.LABEL_ROLE]
    parent = _parent_for(models_by_name, namespace, instance, _owner_uid(meta))
    if parent is None:
        return
    try:
        spec, status = _parse(parent.get("spec") or {}, parent.get("status") or {})
    except UnreadableSpec:
        return  # the reconcile reports it (SpecNotUnderstood); rendering children needs the spec
    if _workload_kind(spec, role) != kind:
        return  # the role is now the other kind: this one is being pruned (apply.PRUNED_KINDS)
    if event.get("type") == "DELETED":
        try:
            recreated = _apply_deployment(state, parent, role)
        except ApplyError as exc:
            if not exc.namespace_terminating:
                raise
            # The namespace is going (it takes the model with it): nothing is re-created, nothing said.
            log.info("%s/%s: namespace being deleted; %s not re-created", namespace, instance, meta["name"])
            return
        if recreated is not None:
            kopf.event(
                parent, type="Warning", reason="ChildRecreated", message=f"{kind} {meta['name']} re-created"
            )
        return
    target = target_replicas(spec, status, role)  # type: ignore[arg-type]
    live = (body.get("spec") or {}).get("replicas")
    adjust = _unchanged
    # Only a value someone else wrote is drift. Replicas the operator wrote itself that differ from the
    # target are its own change in progress: restoring them here would lower a pool before the
    # reconcile (or the autoscaler) has marked the pods that should go.
    if live != target and replicas_set_by_others(body, resources.FIELD_MANAGER):
        _apply_deployment(state, parent, role)
        message = f"{kind} {meta['name']} was scaled to {live} outside the operator; restored to {target}"
        kopf.event(parent, type="Warning", reason="ReplicasRestored", message=message)
        adjust = _drift_corrected(message, _now())
    _mirror_status(state, parent, adjust, workloads, pods_by_model)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
def on_job_event(
    event: kopf.RawEvent,
    namespace: str,
    meta: kopf.Meta,
    body: kopf.Body,
    memo: kopf.Memo,
    models_by_name: kopf.Index,
    **_: Any,
) -> None:
    """A model cache fill Job moved: record it in the parent's status (ModelCacheReady) and apply the
    children again, so pools waiting for the first fill start and pods move to a newly filled key."""
    state = _state(memo)
    instance, key = meta["labels"][resources.LABEL_INSTANCE], meta["labels"].get(resources.LABEL_CACHE_KEY)
    parent = _parent_for(models_by_name, namespace, instance, _owner_uid(meta))
    if parent is None or key is None:
        return
    try:
        spec, status = _parse(parent.get("spec") or {}, parent.get("status") or {})
    except UnreadableSpec:
        return
    if spec.model.cache is None or resources.cache_key(spec.model) != key:
        return  # the fill of an older source or revision, on its way out
    ctx = _ctx(state, instance, namespace, parent["metadata"]["uid"], state.pod_monitor_available())
    if event.get("type") == "DELETED":
        # deleted by hand (or lost): the fill is re-created unless it is pruned for a newer one
        job = next(c for c in resources.model_cache_children(spec, ctx) if c["kind"] == "Job")
        if job["metadata"]["name"] == meta["name"]:
            state.applier.apply_one(namespace, instance, job)
            log.info("%s/%s: model cache Job %s re-created", namespace, instance, meta["name"])
        return
    generation = parent["metadata"].get("generation")

    def recorded(current: dict[str, Any]) -> api.DisaggregatedModelStatus:
        now = _parse_status(current)
        cache = cache_status_for_spec(spec, now.model_cache)
        if cache is None:  # spec.model.cache is set, so never
            return now
        return with_model_cache(now, cache_status_from_job(cache, dict(body)), _now(), generation)

    if not _write_status(state, dict(parent), recorded):
        raise kopf.TemporaryError("the model's status kept changing while it was written", delay=1)
    fresh = _parse_status(_fresher(dict(parent), _LAST_WRITTEN.get((namespace, instance))))
    if fresh.model_cache != status.model_cache:
        changed = state.applier.apply_changed(
            namespace, instance, resources.render_children(spec, fresh, ctx)
        )
        log.info("%s/%s: model cache %s %s; applied %d children%s", namespace, instance, key,
                 fresh.model_cache.phase if fresh.model_cache else "gone", len(changed),
                 f": {', '.join(changed)}" if changed else "")  # fmt: skip


StatusAdjustment = Callable[[api.DisaggregatedModelStatus], api.DisaggregatedModelStatus]


def _unchanged(status: api.DisaggregatedModelStatus) -> api.DisaggregatedModelStatus:
    return status


def _drift_corrected(message: str, now: str) -> StatusAdjustment:
    """Sets condition DriftCorrected on whatever status the mirror starts from (it may re-read it)."""

    def adjust(status: api.DisaggregatedModelStatus) -> api.DisaggregatedModelStatus:
        conditions = set_condition(status.conditions, "DriftCorrected", "True", "ReplicasRestored", message,
                                   now, status.observed_generation)  # fmt: skip
        return status.model_copy(update={"conditions": conditions})

    return adjust


def _mirror_status(
    state: OperatorState,
    parent: dict[str, Any],
    adjust: StatusAdjustment,
    workloads: WorkloadIndexes,
    pods_by_model: kopf.Index,
) -> None:
    """Patches the parent's status with what its children's current states say (if anything changed)."""
    meta = parent["metadata"]
    namespace, name = meta["namespace"], meta["name"]

    def mirrored(current: dict[str, Any]) -> api.DisaggregatedModelStatus:
        spec, status = _parse(current.get("spec") or {}, current.get("status") or {})
        ctx = _ctx(state, name, namespace, current["metadata"]["uid"], False)
        lws = not _needs_lws(spec) or state.leader_worker_set_available()
        return compute_status(
            spec, adjust(status), _deployment_states(workloads[0], namespace, name, workloads[1]),
            current["metadata"].get("generation") or 0, resources.router_endpoint(spec, ctx), _now(),
            unschedulable=_unschedulable(pods_by_model, namespace, name),
            container_errors=_container_errors(pods_by_model, namespace, name),
            incomplete_groups=_incomplete(spec, pods_by_model, namespace, name),
            ready_groups=_ready_groups(spec, pods_by_model, namespace, name),
            leader_worker_set_available=lws,
        )  # fmt: skip

    try:
        written = _write_status(state, parent, mirrored)
    except UnreadableSpec:
        return  # the reconcile reports it (SpecNotUnderstood); nothing can be mirrored without the spec
    if not written:
        # Someone else keeps writing it: each of those writes is a watch event that mirrors again.
        log.info("status of %s/%s kept changing under the mirror; the next event mirrors it", namespace, name)


def _parse_status(parent: dict[str, Any]) -> api.DisaggregatedModelStatus:
    return api.DisaggregatedModelStatus.model_validate(dict(parent.get("status") or {}))


def _degraded(
    reason: str, message: str, generation: int | None
) -> Callable[[dict[str, Any]], api.DisaggregatedModelStatus]:
    """A _write_status recompute: Degraded=True for `reason` (its Warning Event comes with the write)
    over whatever status the model has."""

    def degrade(parent: dict[str, Any]) -> api.DisaggregatedModelStatus:
        current = _parse_status(parent)
        conditions = set_condition(current.conditions, "Degraded", "True", reason, message[:1000], _now(),
                                   generation)  # fmt: skip
        return current.model_copy(update={"conditions": conditions, "phase": "Degraded"})

    return degrade


def _write_status(
    state: OperatorState,
    parent: dict[str, Any],
    recompute: Callable[[dict[str, Any]], api.DisaggregatedModelStatus],
    attempts: int = 8,
) -> bool:
    """Patches the parent's status to ``recompute(parent)``, conditional on its resourceVersion; False
    when it kept changing for ``attempts`` tries.

    A merge patch replaces the whole conditions list, and the parent at hand (from an event or the
    index) may be older than a status another handler or the autoscaler just wrote. So the write
    names the version it was computed from, and on a conflict the parent is re-read and recomputed.
    """
    meta = parent["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with _status_lock(namespace, name):
        return _write_status_locked(state, parent, recompute, attempts)


_STATUS_LOCKS: dict[tuple[str, str], threading.Lock] = {}
# The model as this process last wrote it. A parent from an event or the index may predate that write
# (the watch lags it): diffed against such a parent, a status equal to what the parent holds looks
# unchanged, the write is skipped, and the newer stored status that another thread wrote stays.
_LAST_WRITTEN: dict[tuple[str, str], dict[str, Any]] = {}
_STATUS_LOCKS_GUARD = threading.Lock()


def _status_lock(namespace: str, name: str) -> threading.Lock:
    """One lock per model: its reconcile and the mirrors of its children's events run in parallel
    threads, and conflicting conditional writes among them could each give up, leaving the status
    behind the children until some later event. Serialised, the last one to run writes what it saw."""
    with _STATUS_LOCKS_GUARD:
        return _STATUS_LOCKS.setdefault((namespace, name), threading.Lock())


def _fresher(parent: dict[str, Any], written: dict[str, Any] | None) -> dict[str, Any]:
    """The newer of two copies of a model, by resourceVersion (etcd revisions: integers in practice;
    if either is not, the parent at hand)."""
    if written is None or written["metadata"].get("uid") != parent["metadata"].get("uid"):
        return parent
    try:
        newer = int(written["metadata"]["resourceVersion"]) > int(parent["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return parent
    return written if newer else parent


def _write_status_locked(
    state: OperatorState,
    parent: dict[str, Any],
    recompute: Callable[[dict[str, Any]], api.DisaggregatedModelStatus],
    attempts: int,
) -> bool:
    meta = parent["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    parent = _fresher(parent, _LAST_WRITTEN.get((namespace, name)))
    for attempt in range(attempts):
        before = _parse_status(parent)
        after = recompute(parent)
        diff = status_merge_patch(before, after)
        if not diff:  # an empty {"status": {}} would still be sent as a PATCH
            return True
        try:
            version = parent["metadata"].get("resourceVersion")
            written = state.kube.patch_status(namespace, name, diff, version)
        except ApiException as exc:
            if exc.status == 404:
                return _model_gone(namespace, name)
            if exc.status == 409:
                # Several writers (the reconcile, the mirror of each child's events, the autoscaler) may
                # race on one model: a short random pause lets one of them finish instead of all retrying
                # in step until the attempts run out.
                time.sleep(random.uniform(0, 0.05 * (attempt + 1)))
            elif exc.status == 0 or exc.status >= 500:
                # No answer or a server error (an API server or etcd restarting): an event handler's
                # failure is not retried by kopf, so the mirror of a child's event would be lost.
                log.warning(
                    "%s/%s: status write failed (%s %s), retrying", namespace, name, exc.status, exc.reason
                )
                time.sleep(0.25 * (attempt + 1))
            else:
                raise
            try:
                parent = state.kube.get_model(namespace, name)
            except ApiException as read_error:
                if read_error.status == 404:
                    return _model_gone(namespace, name)
                if read_error.status not in (0, 500, 502, 503, 504):
                    raise
            continue
        _LAST_WRITTEN[(namespace, name)] = written
        for event_type, reason, message in condition_events(before, after):
            kopf.event(parent, type=event_type, reason=reason, message=message[:1000])
        return True
    return False


def _model_gone(namespace: str, name: str) -> bool:
    """The model was deleted after the event behind this write (a child's event during its cascade
    deletion): there is no status left to write, which is not a handler failure."""
    log.info("%s/%s: deleted before its status was written; nothing to write", namespace, name)
    _LAST_WRITTEN.pop((namespace, name), None)
    return True


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
def on_pod_event(
    namespace: str,
    meta: kopf.Meta,
    memo: kopf.Memo,
    models_by_name: kopf.Index,
    deployments_by_model: kopf.Index,
    leader_worker_sets_by_model: kopf.Index,
    pods_by_model: kopf.Index,
    **_: Any,
) -> None:
    """Mirrors scheduling failures, stuck containers and partly placed groups (and their end) of a
    model's pods into its status."""
    instance = (meta.get("labels") or {}).get(resources.LABEL_INSTANCE)
    parent = next(iter(models_by_name.get((namespace, instance), [])), None)
    if parent is None or parent["metadata"].get("deletionTimestamp"):
        return
    status = _parse_status(parent)
    scheduled = next((c for c in status.conditions if c.type == "PodsScheduled"), None)
    degraded = next((c for c in status.conditions if c.type == "Degraded"), None)
    wanted = unschedulable_message(_unschedulable(pods_by_model, namespace, instance))
    stuck = _container_errors(pods_by_model, namespace, instance)
    said = degraded is not None and all(f"{role}: {why}" in degraded.message for role, why in stuck.items())
    # a stuck container that Degraded does not name yet, or Degraded naming one that is no longer stuck
    cleared = degraded is not None and not stuck and _STUCK_IN_MESSAGE.search(degraded.message) is not None
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    try:
        incomplete = _incomplete(api.DisaggregatedModelSpec.model_validate(dict(parent.get("spec") or {})),
                                 pods_by_model, namespace, instance)  # fmt: skip
    except ValidationError:
        incomplete = {}
    ready_message = ready.message if ready is not None else ""
    groups_said = all(why in ready_message for why in incomplete.values()) and (
        bool(incomplete) == (ready is not None and ready.reason == "IncompleteGroup")
    )
    # A group pod's readiness always counts: the LeaderWorkerSet's own status may not move with it.
    in_group = groups.SET_NAME_LABEL in (meta.get("labels") or {})
    quiet = scheduled is not None and scheduled.message == wanted and said and not cleared and groups_said
    if quiet and not in_group:
        return  # most pod events (starts, readiness) change nothing here; Deployment events cover them
    _mirror_status(_state(memo), parent, _unchanged, (deployments_by_model, leader_worker_sets_by_model),
                   pods_by_model)  # fmt: skip


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def on_model_event(
    event: kopf.RawEvent,
    namespace: str,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    deployments_by_model: kopf.Index,
    leader_worker_sets_by_model: kopf.Index,
    **_: Any,
) -> None:
    """Applies replica targets that changed through status (the autoscaler's desiredReplicas) to the
    roles' Deployments or LeaderWorkerSets (groups)."""
    if event.get("type") == "DELETED":
        with _STATUS_LOCKS_GUARD:  # nothing writes its status any more
            _STATUS_LOCKS.pop((namespace, name), None)
            _LAST_WRITTEN.pop((namespace, name), None)
        return
    if event.get("type") not in ("MODIFIED", None) or body.get("metadata", {}).get("deletionTimestamp"):
        return
    spec_dict = body.get("spec") or {}
    if (spec_dict.get("autoscaling") or {}).get("mode") != "auto":
        return  # replicas then come from spec only, which the update handler applies
    state = _state(memo)
    try:
        spec, status = _parse(spec_dict, body.get("status") or {})
    except UnreadableSpec:
        return  # the reconcile reports it (SpecNotUnderstood)
    states = _deployment_states(deployments_by_model, namespace, name, leader_worker_sets_by_model)
    for role in api.WORKER_ROLES:
        current = states.get(role)
        target = target_replicas(spec, status, role)
        if current is not None and current.spec_replicas != target:
            served, num_removed = spec.model.served_name or name, current.spec_replicas - target
            victims = _maybe_mark_victims(state, namespace, name, served, role, num_removed, spec)
            _apply_deployment(state, dict(body), role)
            message = f"{role} scaled {current.spec_replicas} -> {target} (autoscaler desiredReplicas)"
            if victims:
                message += f"; least loaded first: {', '.join(victims)}"
            kopf.event(body, type="Normal", reason="Scaled", message=message[:1000])


def _mark_spec_scale_downs(
    state: OperatorState,
    namespace: str,
    name: str,
    spec: api.DisaggregatedModelSpec,
    status: api.DisaggregatedModelStatus,
    states: dict[str, DeploymentState],
) -> list[str]:
    """Marks victims for each worker role whose replicas the spec lowers; one event message per role."""
    messages = []
    for role in api.WORKER_ROLES:
        current, target = states.get(role), target_replicas(spec, status, role)
        if current is None or target >= current.spec_replicas:
            continue
        served, removed = spec.model.served_name or name, current.spec_replicas - target
        victims = _maybe_mark_victims(state, namespace, name, served, role, removed, spec)
        least = f"; least loaded first: {', '.join(victims)}" if victims else ""
        messages.append(f"{role} scaled {current.spec_replicas} -> {target} (spec.{role}.replicas){least}")
    return messages


def _maybe_mark_victims(
    state: OperatorState,
    namespace: str,
    name: str,
    served: str,
    role: str,
    num_removed: int,
    spec: api.DisaggregatedModelSpec | None = None,
) -> list[str]:
    """Before a scale-down, sets each of the role's pods' deletion cost (victims.py); returns the pods
    expected to go. Best effort: a failure is logged and counted, and the scale-down goes ahead.

    The annotations are written, then a short pause, then the Deployment is patched, so that the
    ReplicaSet controller's pod informer has seen the costs when it picks.
    """
    if num_removed <= 0:
        return []
    if spec is not None and role in api.WORKER_ROLES and groups.spans_nodes(getattr(spec, role)):
        # A LeaderWorkerSet removes its highest-numbered groups (StatefulSet order): the ReplicaSet
        # controller's pod-deletion-cost does not apply, so there is nothing to mark.
        return []
    selector = ",".join(f"{k}={v}" for k, v in resources.selector_labels(name, role).items())
    try:
        pods = [WorkerPod.from_body(b) for b in state.kube.list("v1", "Pod", namespace, selector)]
    except Exception as exc:  # whatever went wrong, the pool must still shrink
        log.warning("%s/%s %s: cannot list pods to choose victims: %s", namespace, name, role, exc)
        VICTIM_ERRORS.labels(served, role, "list").inc()
        return []
    loads, unread = state.pod_loads.read(namespace, pods, resources.METRICS_PORT)
    for pod, why in unread.items():
        log.warning("%s/%s: load of pod %s unknown (lowest deletion cost): %s", namespace, name, pod, why)
        VICTIM_ERRORS.labels(served, role, "read").inc()
    plan = plan_deletion_costs(pods, loads, num_removed)
    annotated = 0
    for pod, cost in plan.changed.items():
        try:
            state.kube.annotate_pod(namespace, pod, {DELETION_COST: str(cost)})
            annotated += 1
        except Exception as exc:  # e.g. 403 where the chart's pod-deletion-cost grant is off
            log.warning("%s/%s: cannot set %s on pod %s: %s", namespace, name, DELETION_COST, pod, exc)
            VICTIM_ERRORS.labels(served, role, "annotate").inc()
    if annotated:
        # The ReplicaSet controller reads pods and ReplicaSets from separate watches, with no order
        # between them, so under load it could see the lower replica count before the new costs and
        # pick by its other rules. A pause before the scale-down lets its pod watch catch up;
        # scale-downs are rare, the pause is cheap. (The wrong victims CI once showed came from the
        # Deployment handler lowering replicas on its own, fixed in on_deployment_event.)
        time.sleep(state.config.deletion_cost_settle_seconds)
    log.info("%s/%s %s: deletion costs %s; expected to go: %s", namespace, name, role, plan.costs,
             plan.victims)  # fmt: skip
    return plan.victims
