"""Two real `kvrelay-operator` processes: only the Lease holder acts; the other takes over on its death."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvrelay_envtest import get_json, wait_for
from operator_process import LEASE_SECONDS, OperatorProcess

pytestmark = pytest.mark.controlplane


def _cr(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kvrelay.dev/v1alpha1",
            "kind": "DisaggregatedModel",
            "metadata": {"name": name},
            "spec": {"model": {"source": "/models/tiny"}},
        }
    )


@pytest.fixture
def two_operators(
    namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[list[OperatorProcess]]:
    seconds = getattr(request, "param", LEASE_SECONDS)
    procs = [OperatorProcess(namespace, tmp_path / f"operator-{i}.log", seconds) for i in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


# A lease longer than the default 3 s: on a loaded 2-core machine a 2 s renew deadline can lapse while
# the leader starts kopf, and a legitimate hand-over then reads as "the follower acts".
@pytest.mark.parametrize("two_operators", [10], indirect=True)
def test_only_the_lease_holder_acts(kubectl, namespace, two_operators) -> None:
    def holder() -> str | None:
        lease = get_json(kubectl, "lease", "kvrelay-operator", "-n", namespace)
        return lease["spec"].get("holderIdentity")

    first = wait_for(holder, timeout=60, what="a Lease holder")
    wait_for(lambda: all(p.identity() for p in two_operators), timeout=30, what="both identities logged")
    leader = next(p for p in two_operators if p.identity() == first)
    follower = next(p for p in two_operators if p is not leader)
    wait_for(leader.live, timeout=30, what="the leader's liveness endpoint")
    assert not follower.live(), (
        f"the follower must not run kopf at all (holder now {holder()!r}, was {first!r});\n"
        f"leader log:\n{leader.log.read_text()[-1500:]}\nfollower log:\n{follower.log.read_text()[-1500:]}"
    )
    # Both serve /metrics with the autoscaler's series registered (the chart scrapes every replica).
    for p in two_operators:
        assert "kvrelay_autoscaler_desired_replicas" in p.metrics()

    kubectl("apply", "-n", namespace, "-f", "-", stdin=_cr("a"), check=True)
    wait_for(
        lambda: get_json(kubectl, "deployment", "a-decode", "-n", namespace), timeout=60, what="a's children"
    )

    leader.stop()  # a crash: no Lease release, so the follower must wait for it to expire
    second = wait_for(
        lambda: (h := holder()) != first and h, timeout=60, what="the follower taking the Lease"
    )
    assert second == follower.identity()
    kubectl("apply", "-n", namespace, "-f", "-", stdin=_cr("b"), check=True)
    wait_for(
        lambda: get_json(kubectl, "deployment", "b-decode", "-n", namespace), timeout=60, what="b's children"
    )
    assert follower.proc.poll() is None


@pytest.mark.parametrize("two_operators", [15], indirect=True)  # the chart's lease duration
def test_sigterm_hands_the_lease_over_at_once(kubectl, namespace, two_operators) -> None:
    """A rolling update: the leader stops kopf, releases the Lease and exits 0; the standby leads
    within 2 s of that, not after the 15 s lease duration."""
    from kubernetes import client, config

    config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    leases = client.CoordinationV1Api()

    def holder() -> str | None:
        try:
            return leases.read_namespaced_lease("kvrelay-operator", namespace).spec.holder_identity
        except client.ApiException:
            return None

    first = wait_for(holder, timeout=60, what="a Lease holder")
    wait_for(lambda: all(p.identity() for p in two_operators), timeout=30, what="both identities logged")
    leader = next(p for p in two_operators if p.identity() == first)
    follower = next(p for p in two_operators if p is not leader)
    wait_for(leader.live, timeout=30, what="the leader's liveness endpoint")

    signalled = time.monotonic()
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.proc.wait(timeout=30) == 0, leader.log.read_text()[-2000:]
    exited = time.monotonic()
    second = wait_for(lambda: (h := holder()) != first and h, timeout=20, interval=0.05, what="new holder")
    leads = time.monotonic()
    assert second == follower.identity()
    assert "Lease released" in leader.log.read_text()
    handover = {"sigterm_to_exit_s": round(exited - signalled, 2),
                "exit_to_new_leader_s": round(leads - exited, 2)}  # fmt: skip
    print(json.dumps(handover))
    assert handover["exit_to_new_leader_s"] < 2.0, handover
    wait_for(follower.live, timeout=30, what="the new leader running kopf")
    kubectl("apply", "-n", namespace, "-f", "-", stdin=_cr("c"), check=True)
    wait_for(
        lambda: get_json(kubectl, "deployment", "c-decode", "-n", namespace), timeout=60, what="c's children"
    )
