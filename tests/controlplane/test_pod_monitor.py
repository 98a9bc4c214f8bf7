"""A PodMonitor is rendered exactly when the Prometheus Operator CRD is served (podMonitor: auto)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from kvrelay_envtest import get_json, wait_for

pytestmark = pytest.mark.controlplane

# The Prometheus Operator's PodMonitor kind, reduced to what the API server needs to store it.
PODMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podmonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "PodMonitor",
            "listKind": "PodMonitorList",
            "plural": "podmonitors",
            "singular": "podmonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


@pytest.fixture
def prometheus_operator_crd(kubectl) -> Iterator[None]:
    kubectl("apply", "-f", "-", stdin=json.dumps(PODMONITOR_CRD), check=True)
    kubectl("wait", "--for=condition=Established", "crd/podmonitors.monitoring.coreos.com", check=True)
    try:
        yield
    finally:  # other tests in this session expect no Prometheus Operator
        kubectl(
            "delete", "crd", "podmonitors.monitoring.coreos.com", "--wait=true", "--timeout=60s", check=True
        )


def _cr(name: str, pod_monitor: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kvrelay.dev/v1alpha1",
            "kind": "DisaggregatedModel",
            "metadata": {"name": name},
            "spec": {"model": {"source": "/models/tiny"}, "monitoring": {"podMonitor": pod_monitor}},
        }
    )


def test_pod_monitor_follows_the_crds(kubectl, namespace, prometheus_operator_crd, start_operator) -> None:
    with start_operator():  # started after the CRD exists: detection happens at reconcile time
        kubectl("apply", "-n", namespace, "-f", "-", stdin=_cr("auto", "auto"), check=True)
        kubectl("apply", "-n", namespace, "-f", "-", stdin=_cr("off", "disabled"), check=True)
        monitor = wait_for(
            lambda: get_json(kubectl, "podmonitor", "auto", "-n", namespace),
            timeout=30,
            what="PodMonitor of 'auto'",
        )
        assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "auto"
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        assert monitor["metadata"]["ownerReferences"][0]["name"] == "auto"
        wait_for(
            lambda: get_json(kubectl, "deployment", "off-decode", "-n", namespace), timeout=30, what="'off'"
        )
        names = [m["metadata"]["name"] for m in get_json(kubectl, "podmonitors", "-n", namespace)["items"]]
        assert names == ["auto"]
