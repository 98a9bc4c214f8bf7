"""Control-plane fixtures: a real etcd + kube-apiserver per session, CRDs applied with a real kubectl,
a fresh namespace per test and a namespace-scoped in-process operator (kopf.testing.KopfRunner)."""

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

CRD_NAME = "disaggregatedmodels.kvrelay.dev"


# `-m` options for kopf: the modules kvrelay-operator loads (handlers and the autoscaler timer).
HANDLER_MODULES = [arg for module in main.HANDLER_MODULES for arg in ("-m", module)]


@pytest.fixture(scope="session")
def cluster() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver for the whole session; KUBECONFIG points at it meanwhile."""
    assets, reason = find_assets()
    if assets is None:
        pytest.skip(reason)
    with control_plane(assets) as cp:
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
    """A fresh namespace per test (left for the session teardown: no namespace controller runs)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name, check=True)
    yield name


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
