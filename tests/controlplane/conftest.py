"""Control-plane fixtures: per session a real etcd, kube-apiserver, kube-controller-manager and
kube-scheduler with kwok node pools (pods are created, scheduled and go Ready; nobody writes their
status by hand), CRDs applied with a real kubectl, a fresh namespace per test and a
namespace-scoped in-process operator (kopf.testing.KopfRunner)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kvrelay_envtest import (
    REPO_ROOT,
    ControlPlane,
    control_plane,
    find_assets,
    find_kubectl,
    get_json,
    wait_for,
)
from kvrelay_operator import main
from kvrelay_operator.kube import KubeClient
from kwok_nodes import NodeSpec, add_kwok_nodes, cpu_node, find_kwok, gpu_node, start_kwok

CRD_NAME = "disaggregatedmodels.kvrelay.dev"


# `-m` options for kopf: the modules kvrelay-operator loads (handlers and the autoscaler timer).
HANDLER_MODULES = [arg for module in main.HANDLER_MODULES for arg in ("-m", module)]


# The examples' GPU pools (tainted nvidia.com/gpu) with room for every test's models at once, and
# untainted nodes for routers and for models that set no tolerations (examples/tiny.yaml).
NODE_POOLS: list[NodeSpec] = [
    *(gpu_node(f"h100-{i}", "prefill-h100", 8, zone=f"zone-{'ab'[i % 2]}") for i in range(3)),
    *(gpu_node(f"l40s-{i}", "decode-l40s", 4, zone=f"zone-{'ab'[i % 2]}") for i in range(4)),
    *(cpu_node(f"system-{i}") for i in range(2)),
    *(NodeSpec(f"gpu-{i}", "untainted-gpu", {**gpu_node("", "", 8).capacity}) for i in range(2)),
]


@pytest.fixture(scope="session")
def cluster() -> Iterator[ControlPlane]:
    """The control plane with controllers and kwok node pools for the whole session; KUBECONFIG
    points at it meanwhile."""
    assets, reason = find_assets(controllers=True)
    if assets is None:
        pytest.skip(reason)
    kwok, reason = find_kwok(assets)
    if kwok is None:
        pytest.skip(reason)
    with control_plane(assets, controllers=True) as cp:
        start_kwok(cp, kwok)
        add_kwok_nodes(cp, NODE_POOLS)
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        try:
            yield cp
        finally:
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous


Kubectl = Callable[..., subprocess.CompletedProcess[str]]
StartOperator = Callable[[], contextlib.AbstractContextManager[KopfRunner]]


@pytest.fixture(scope="session")
def kubectl(cluster: ControlPlane) -> Kubectl:
    """Runs the real kubectl against the test cluster: kubectl("get", "ns", check=True)."""
    binary, reason = find_kubectl()
    if binary is None:
        pytest.skip(reason)

    def run(*args: str, check: bool = False, stdin: str | None = None, timeout: float = 60) -> Any:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        result = subprocess.run(
            [str(binary), *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    """The CRDs applied as users apply them, and established."""
    kubectl("apply", "-f", str(REPO_ROOT / "crds"), check=True)
    # Not `kubectl wait`: right after apply the CRD may have no conditions yet, which it reports as an error.
    wait_for(lambda: _established(get_json(kubectl, "crd", CRD_NAME)), timeout=30, what="CRD Established")


def _established(crd: dict[str, Any]) -> bool:
    conditions = crd.get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture
def kube(cluster: ControlPlane) -> KubeClient:
    """The operator's own API client, for reads and status writes in tests."""
    return KubeClient.from_environment()


@pytest.fixture
def namespace(kubectl: Kubectl, crds: None) -> Iterator[str]:
    """A fresh namespace per test, deleted after it (the namespace controller frees its pods)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name, check=True)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def start_operator(namespace: str) -> StartOperator:
    """A factory of namespace-scoped operator runs; each must end cleanly, without handler errors."""

    @contextlib.contextmanager
    def start() -> Iterator[KopfRunner]:
        args = ["run", "--standalone", "--namespace", namespace, *HANDLER_MODULES]
        with KopfRunner(args, timeout=60) as runner:
            yield runner
        assert runner.exception is None, runner.output[-3000:]
        assert runner.exit_code == 0, runner.output[-3000:]
        assert "failed with an exception" not in runner.output, runner.output[-3000:]

    return start


@pytest.fixture
def operator(
    start_operator: Callable[[], contextlib.AbstractContextManager[KopfRunner]],
) -> Iterator[KopfRunner]:
    """One operator run for the whole test."""
    with start_operator() as runner:
        yield runner
