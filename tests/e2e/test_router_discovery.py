"""Kubernetes discovery against a real kube-apiserver: the router's pool follows the workers' EndpointSlices.

EndpointSlices are written as the EndpointSlice controller would for the prefill/decode headless
Services (labels from DESIGN.md); the addresses point at live KServe v2 endpoints on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kvrelay_worker.router.discovery import EndpointSliceDiscovery
from kvrelay_worker.router.pool import WorkerPool
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controlplane"))
from kvrelay_envtest import ControlPlane, control_plane, find_assets

pytestmark = pytest.mark.e2e
INSTANCE = "demo"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    assets, reason = find_assets()
    if assets is None:
        pytest.skip(reason)
    with control_plane(assets) as cp:
        yield cp


def host_ip() -> str:
    """A non-loopback IPv4 of this host: the API server refuses loopback endpoint addresses."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.254.254.254", 1))  # UDP connect sends nothing; it only picks a route
        address = s.getsockname()[0]
        if not address.startswith("127."):
            return address
    for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
        if not str(info[4][0]).startswith("127."):
            return str(info[4][0])
    pytest.fail("this host has no non-loopback IPv4 address to put in an EndpointSlice")


class _Ready(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)


@contextlib.asynccontextmanager
async def ready_endpoints(n: int, ip: str) -> AsyncIterator[list[int]]:
    """n live gRPC endpoints answering ServerReady on `ip`."""
    servers, ports = [], []
    for _ in range(n):
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Ready(), server)
        ports.append(server.add_insecure_port(f"{ip}:0"))
        await server.start()
        servers.append(server)
    try:
        yield ports
    finally:
        for server in servers:
            await server.stop(grace=None)


def endpoint_slice(name: str, role: str, ip: str, port: int, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "kvrelay",
                "app.kubernetes.io/instance": INSTANCE,
                "kvrelay.dev/role": role,
                "kubernetes.io/service-name": f"{INSTANCE}-{role}",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}],
    }


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_pool_follows_endpointslices(cluster: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    kubernetes.config.load_kube_config(config_file=str(cluster.kubeconfig))
    core, disc = kubernetes.client.CoreV1Api(), kubernetes.client.DiscoveryV1Api()
    namespace = f"discovery-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})

    def addresses(role: str) -> list[str]:
        return sorted(a for a, w in pool.roles[role].workers.items() if w.healthy)  # type: ignore[literal-required]

    pool = WorkerPool(health_interval_s=0.2)
    discovery = EndpointSliceDiscovery(INSTANCE, namespace, "grpc")
    ip = host_ip()
    async with ready_endpoints(3, ip) as (p0, d0, d1):
        create = disc.create_namespaced_endpoint_slice
        create(namespace, endpoint_slice("demo-prefill-a", "prefill", ip, p0, True))
        create(namespace, endpoint_slice("demo-decode-a", "decode", ip, d0, True))
        # Another instance's slice must be ignored by the label selector.
        other = endpoint_slice("other-decode", "decode", ip, 1, True)
        other["metadata"]["labels"]["app.kubernetes.io/instance"] = "other"
        create(namespace, other)
        await discovery.start(pool)
        pool.start()
        try:
            await wait_until(lambda: addresses("prefill") == [f"{ip}:{p0}"], "prefill listed")
            await wait_until(lambda: addresses("decode") == [f"{ip}:{d0}"], "decode listed")
            assert pool.ready()

            # Scale up: a new decode slice is watched in.
            create(namespace, endpoint_slice("demo-decode-b", "decode", ip, d1, True))
            want = sorted([f"{ip}:{d0}", f"{ip}:{d1}"])
            await wait_until(lambda: addresses("decode") == want, "second decode added")

            # A pod that turns unready drops out; a deleted slice drops out.
            patch = {"endpoints": [{"addresses": [ip], "conditions": {"ready": False}}]}
            disc.patch_namespaced_endpoint_slice("demo-decode-a", namespace, patch)
            await wait_until(lambda: addresses("decode") == [f"{ip}:{d1}"], "unready decode removed")
            disc.delete_namespaced_endpoint_slice("demo-prefill-a", namespace)
            await wait_until(lambda: addresses("prefill") == [], "deleted prefill removed")
            assert not pool.ready()
        finally:
            await discovery.stop()
            await pool.close()
            core.delete_namespace(namespace)
