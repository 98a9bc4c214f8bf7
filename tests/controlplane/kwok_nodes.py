"""Fake GPU node pools with kwok: Node objects whose "kubelet" is kwok, so pods scheduled there go
Running/Ready without containers and disappear when deleted.

kwok manages only nodes carrying KWOK_ANNOTATION; nodes of a real node agent lack it and are left alone.
The kwok binary has no built-in lifecycle, so it runs with kwokctl's default Stages (node initialize +
lease heartbeat, pod ready/complete/delete), which hack/build-controlplane.sh stores next to it.
"""

from __future__ import annotations

import os
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrelay_envtest import ControlPlane, start_logged, wait_for

KWOK_VERSION = "0.8.0"
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
POOL_LABEL = "kvrelay.dev/node-pool"
GPU_RESOURCE = "nvidia.com/gpu"
RDMA_RESOURCE = "rdma/ib"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# Pod IPs kwok hands out: shared address space (RFC 6598), clear of the service range (10.0.0.0/24,
# kwok's own default) and of the 10.x bridges a real node agent may use.
POD_CIDR = "100.64.0.0/16"
# kwok renews each node's Lease every quarter of this, which keeps the node lifecycle controller
# from marking it NotReady (a kubelet's default).
NODE_LEASE_SECONDS = 40


def find_kwok(assets: Path | None = None) -> tuple[Path | None, str]:
    """kwok and its stages.yaml: <assets>/kwok if present, else the cache hack/build-controlplane.sh fills."""
    candidates = [assets / "kwok"] if assets is not None else []
    cache = Path(os.environ.get("KVRELAY_CACHE", Path.home() / ".cache" / "kvrelay"))
    candidates.append(cache / "controlplane" / f"kwok-v{KWOK_VERSION}" / "kwok")
    for kwok in candidates:
        if kwok.is_file() and (kwok.parent / "stages.yaml").is_file():
            return kwok, ""
    return None, f"no kwok with stages.yaml at {', '.join(map(str, candidates))} (hack/build-controlplane.sh)"


def start_kwok(cp: ControlPlane, kwok: Path, start_timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
    """Starts kwok against cp for the nodes annotated KWOK_ANNOTATION; it stops with the control plane.

    Returns once kwok watches nodes; its log is <cp.workdir>/kwok.log.
    """
    key, value = KWOK_ANNOTATION
    # kwok always loads ~/.kwok/kwok.yaml when it exists: a private HOME keeps a user's config out.
    home = cp.workdir / "kwok-home"
    home.mkdir(exist_ok=True)
    proc, log = start_logged(cp.processes, cp.workdir, "kwok", [
        str(kwok), f"--kubeconfig={cp.kubeconfig}", f"--config={kwok.parent / 'stages.yaml'}",
        "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={key}={value}",
        f"--node-lease-duration-seconds={NODE_LEASE_SECONDS}", f"--cidr={POD_CIDR}",
    ], env={**os.environ, "HOME": str(home)})  # fmt: skip

    def started() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"kwok exited with {proc.returncode}; log:\n{log.read_text()[-4000:]}")
        # Logged (as JSON) just before its controllers start; nodes made earlier are listed anyway.
        return '"msg":"Watch nodes"' in log.read_text()

    wait_for(started, timeout=start_timeout_s, what=f"kwok to start (log {log})")
    return proc


@dataclass
class NodeSpec:
    """One fake node: pool, zone, capacity (also its allocatable) and taints."""

    name: str
    pool: str
    capacity: dict[str, str]
    zone: str = "zone-a"
    taints: list[dict[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


def gpu_node(name: str, pool: str, gpus: int, *, zone: str = "zone-a", rdma: int = 8) -> NodeSpec:
    """A GPU node as in the examples' pools: 96 CPU, 1 TiB, `gpus` GPUs, RDMA, tainted nvidia.com/gpu."""
    capacity = {"cpu": "96", "memory": "1Ti", "pods": "110", "ephemeral-storage": "1Ti",
                GPU_RESOURCE: str(gpus), RDMA_RESOURCE: str(rdma)}  # fmt: skip
    return NodeSpec(name, pool, capacity, zone, [dict(GPU_TAINT)])


def cpu_node(name: str, pool: str = "system", *, zone: str = "zone-a") -> NodeSpec:
    """An untainted CPU node where routers and other non-GPU pods land."""
    capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "1Ti"}
    return NodeSpec(name, pool, capacity, zone)


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    """The Node object for spec, status included (the API keeps a Node's status on create)."""
    key, value = KWOK_ANNOTATION
    # A stable, distinct-enough InternalIP per name, for kwok to report as the pods' hostIP.
    ip = zlib.crc32(spec.name.encode()) % (254 * 254)
    labels = {
        "kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        "type": "kwok", POOL_LABEL: spec.pool, "topology.kubernetes.io/zone": spec.zone, **spec.labels,
    }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "annotations": {key: value}, "labels": labels},
        "spec": {"taints": spec.taints},
        "status": {
            "capacity": spec.capacity,
            "allocatable": spec.capacity,
            "addresses": [
                {"type": "InternalIP", "address": f"100.65.{ip // 254 + 1}.{ip % 254 + 1}"},
                {"type": "Hostname", "address": spec.name},
            ],
        },
    }


def add_kwok_node(cp: ControlPlane, spec: NodeSpec, ready_timeout_s: float = 30.0) -> dict[str, Any]:
    """Creates the node and waits until kwok reports it Ready with spec's allocatable; returns it."""
    return add_kwok_nodes(cp, [spec], ready_timeout_s)[0]


def add_kwok_nodes(
    cp: ControlPlane, specs: list[NodeSpec], ready_timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """add_kwok_node for each spec: all are created first, then awaited."""
    for spec in specs:
        cp.request("POST", "/api/v1/nodes", node_manifest(spec))

    def ready(spec: NodeSpec) -> dict[str, Any] | None:
        node = cp.request("GET", f"/api/v1/nodes/{spec.name}")
        status = node.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        placed = conditions.get("Ready") == "True" and status.get("allocatable") == spec.capacity
        return node if placed else None

    return [
        wait_for(lambda spec=spec: ready(spec), timeout=ready_timeout_s, interval=0.2,
                 what=f"kwok node {spec.name} Ready")
        for spec in specs
    ]  # fmt: skip
