"""Worker discovery: static addresses (local) or EndpointSlices of the workers' headless Services (cluster).

RBAC needed in the router's namespace for kubernetes discovery:
    apiGroups: ["discovery.k8s.io"], resources: ["endpointslices"], verbs: ["list", "watch"]
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from kvrelay_worker.router.pool import Role, WorkerPool

log = logging.getLogger(__name__)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
WATCH_TIMEOUT_S = 30  # re-issue the watch this often, so stop() is noticed


class Discovery(Protocol):
    async def start(self, pool: WorkerPool) -> None: ...
    async def stop(self) -> None: ...


class StaticDiscovery:
    """Fixed addresses from flags."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str]) -> None:
        self.addresses: dict[Role, list[str]] = {"prefill": list(prefill), "decode": list(decode)}

    async def start(self, pool: WorkerPool) -> None:
        for role, addresses in self.addresses.items():
            await pool.set_addresses(role, addresses)

    async def stop(self) -> None:
        return None


def role_selector(instance: str, role: Role) -> str:
    """Label selector of one role's headless Service endpoints (labels from DESIGN.md)."""
    return f"app.kubernetes.io/instance={instance},kvrelay.dev/role={role}"


def addresses_from_slices(slices: Mapping[str, Mapping[str, Any]], port_name: str) -> list[str]:
    """Ready `host:port` addresses in EndpointSlices (API JSON form), sorted and de-duplicated."""
    found: set[str] = set()
    for item in slices.values():
        ports = item.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
        if port is None and len(ports) == 1:
            port = ports[0].get("port")
        if port is None:
            continue
        for endpoint in item.get("endpoints") or []:
            # A nil `ready` means "unknown" and is to be read as ready (EndpointSlice API docs).
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                host = f"[{address}]" if ":" in address else address
                found.add(f"{host}:{port}")
    return sorted(found)


class EndpointSliceDiscovery:
    """Watch the prefill and decode EndpointSlices and push address changes into the pool."""

    def __init__(self, instance: str, namespace: str | None = None, port_name: str = "grpc") -> None:
        self.instance = instance
        self.namespace = namespace or self._own_namespace()
        self.port_name = port_name
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _own_namespace() -> str:
        if SERVICE_ACCOUNT_NAMESPACE.exists():
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        return "default"

    async def start(self, pool: WorkerPool) -> None:
        import kubernetes  # lazy: only cluster deployments need the client

        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            # Read KUBECONFIG now: the client's default path is fixed when it is first imported.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        loop = asyncio.get_running_loop()
        for role in ("prefill", "decode"):
            thread = threading.Thread(
                target=self._watch, args=(role, pool, loop), daemon=True, name=f"discovery-{role}"
            )
            thread.start()
            self._threads.append(thread)

    def _watch(self, role: Role, pool: WorkerPool, loop: asyncio.AbstractEventLoop) -> None:
        import kubernetes

        api = kubernetes.client.DiscoveryV1Api()
        serialize = kubernetes.client.ApiClient().sanitize_for_serialization
        selector = role_selector(self.instance, role)
        slices: dict[str, dict[str, Any]] = {}
        last: list[str] | None = None

        def publish() -> None:
            nonlocal last
            addresses = addresses_from_slices(slices, self.port_name)
            if addresses != last:
                last = addresses
                asyncio.run_coroutine_threadsafe(pool.set_addresses(role, addresses), loop)

        while not self._stop.is_set():
            try:
                listing = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
                slices = {s.metadata.name: serialize(s) for s in listing.items}
                publish()
                version = listing.metadata.resource_version
                while not self._stop.is_set():
                    stream = kubernetes.watch.Watch().stream(
                        api.list_namespaced_endpoint_slice,
                        self.namespace,
                        label_selector=selector,
                        resource_version=version,
                        timeout_seconds=WATCH_TIMEOUT_S,
                    )
                    for event in stream:
                        obj = event["object"]
                        version = obj.metadata.resource_version
                        if event["type"] == "DELETED":
                            slices.pop(obj.metadata.name, None)
                        else:
                            slices[obj.metadata.name] = serialize(obj)
                        publish()
            except Exception as exc:  # 410 Gone, API restarts: relist after a pause
                log.warning("endpointslice watch for %s failed (%s); relisting", role, exc)
                self._stop.wait(2.0)

    async def stop(self) -> None:
        self._stop.set()
