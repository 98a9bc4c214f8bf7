"""The operator's only Kubernetes API client: server-side apply, label-selected lists, status patches,
pod annotations, deletes of children a spec switch turned off.

Thin on purpose (raw paths over the official client's ApiClient) so one code path serves every
child kind, including CRD kinds such as PodMonitor; it counts requests for the benchmarks.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter, deque
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kvrelay_operator import api, groups
from kvrelay_operator.resources import FIELD_MANAGER

# kind -> plural, for the kinds the operator writes or reads (all namespaced).
PLURALS = {
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PodMonitor": "podmonitors",
    "NetworkPolicy": "networkpolicies",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Job": "jobs",
    "Pod": "pods",
    "Secret": "secrets",  # created only, never read (handlers._maybe_create_tp_secret)
    groups.KIND: groups.PLURAL,
    api.KIND: api.PLURAL,
}
# kind -> apiVersion of each kind of child a DisaggregatedModel has (resources.render_children).
CHILD_KINDS: dict[str, str] = {
    "Service": "v1",
    "ServiceAccount": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PersistentVolumeClaim": "v1",
    "Job": "batch/v1",
    groups.KIND: groups.API_VERSION,
}
PROMETHEUS_OPERATOR_GROUP_VERSION = "monitoring.coreos.com/v1"


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    """URL path of a namespaced collection."""
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"


class KubeClient:
    """Synchronous, thread-safe API access (kopf runs sync handlers in a thread pool)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._api = api_client
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # verb -> count, for benchmarks
        self.recent: deque[tuple[str, str]] = deque(maxlen=200)  # (verb, path), for debugging

    @classmethod
    def from_environment(cls) -> KubeClient:
        """In-cluster config when running in a pod, else KUBECONFIG / ~/.kube/config."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            # KUBECONFIG is read now, not when the kubernetes package was imported.
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
            )
        return cls(client.ApiClient(configuration))

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "",
    ) -> dict[str, Any]:
        with self._lock:
            self.requests[method] += 1
            self.recent.append((method, path))
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self._api.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()) or None,
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )  # fmt: skip
        try:
            response = self._api.call_api(method, url, header_params=headers, body=body, _request_timeout=30)
            response.read()
        except urllib3.exceptions.HTTPError as exc:
            # No answer (the API server restarting, a connection reset, a timeout): status 0, as the
            # official client reports TLS failures, so that callers handle every failed call as one kind.
            raise ApiException(status=0, reason=f"API server unreachable: {exc}") from exc
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=response.data)
        return json.loads(response.data) if response.data else {}

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as field manager kvrelay-operator; force takes fields back from hand edits."""
        meta = manifest["metadata"]
        path = (
            f"{collection_path(manifest['apiVersion'], manifest['kind'], meta['namespace'])}/{meta['name']}"
        )
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        return self._call("PATCH", path, query, body=manifest, content_type="application/apply-patch+yaml")

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """DELETE one namespaced object (a child its spec no longer renders: apply.PRUNED_KINDS); its
        dependents go too (a Job's pods: batch/v1 would orphan them by default)."""
        path = f"{collection_path(api_version, kind, namespace)}/{name}"
        return self._call("DELETE", path, {"propagationPolicy": "Background"})

    def create(self, manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
        """POST a new object: a model's TP link Secret (created once, never applied); tests and benchmarks
        create DisaggregatedModels this way."""
        return self._call(
            "POST", collection_path(manifest["apiVersion"], manifest["kind"], namespace), body=manifest
        )

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace matching a label selector."""
        path = collection_path(api_version, kind, namespace)
        return self._call("GET", path, {"labelSelector": label_selector}).get("items") or []

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch on a DisaggregatedModel's status subresource; with resource_version, the
        API server refuses it (409 Conflict) if the model changed since that version was read."""
        path = f"{collection_path(api.API_VERSION, api.KIND, namespace)}/{name}/status"
        body: dict[str, Any] = {"status": patch}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._call("PATCH", path, body=body, content_type="application/merge-patch+json")

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any]:
        """JSON merge patch of metadata.annotations only (the chart's admission policy allows the
        operator no other change to a pod)."""
        path = f"{collection_path('v1', 'Pod', namespace)}/{name}"
        body = {"metadata": {"annotations": annotations}}
        return self._call("PATCH", path, body=body, content_type="application/merge-patch+json")

    def get_model(self, namespace: str, name: str) -> dict[str, Any]:
        """A DisaggregatedModel as the API server has it now."""
        return self._call("GET", f"{collection_path(api.API_VERSION, api.KIND, namespace)}/{name}")

    def group_version_served(self, group_version: str) -> bool:
        """Whether the API server serves a group/version (e.g. monitoring.coreos.com/v1)."""
        try:
            self._call("GET", f"/apis/{group_version}")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True
