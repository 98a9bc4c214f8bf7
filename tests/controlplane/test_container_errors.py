"""A model whose pods cannot start (a missing Secret, an image that cannot be pulled) says so within one
pod event: Degraded with the kubelet's own words and a Warning Event, cleared when the pod recovers.

kwok plays the kubelet here, so the test writes the container state the kubelet would (the pod's status
subresource), then the recovery; the operator sees both through the real API server's watch."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from kvrelay_envtest import example, get_json, wait_for

pytestmark = pytest.mark.controlplane

WORDS = 'secret "missing-key" not found'


def _condition(kubectl, namespace: str, kind: str) -> dict[str, Any]:
    status = get_json(kubectl, "disaggregatedmodel", "stuck", "-n", namespace).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _container_state(kubectl, namespace: str, pod: str, state: dict[str, Any]) -> None:
    body = {"status": {"containerStatuses": [
        {"name": "router", "ready": "running" in state, "restartCount": 0, "image": "img", "imageID": "",
         "state": state}]}}  # fmt: skip
    patch = json.dumps(body)
    kubectl(
        "patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch, check=True
    )


def test_a_stuck_container_is_degraded_with_the_kubelets_words(kubectl, namespace: str, operator) -> None:  # type: ignore[no-untyped-def]
    cr = copy.deepcopy(yaml.safe_load(example("tiny.yaml")))
    cr["metadata"]["name"] = "stuck"
    cr["spec"]["router"] = {"apiKeySecret": {"name": "missing-key", "key": "key"}}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cr), check=True)
    selector = "app.kubernetes.io/instance=stuck,kvrelay.dev/role=router"

    def router_pod() -> str | None:
        items = get_json(kubectl, "pods", "-n", namespace, "-l", selector)["items"]
        running = [p for p in items if (p.get("status") or {}).get("phase") == "Running"]
        return running[0]["metadata"]["name"] if running else None

    pod = wait_for(router_pod, timeout=60, what="the router pod")
    wait_for(lambda: _condition(kubectl, namespace, "Degraded").get("status") == "False", timeout=30)
    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": WORDS}}
    _container_state(kubectl, namespace, pod, waiting)
    degraded = wait_for(
        lambda: (c := _condition(kubectl, namespace, "Degraded")).get("status") == "True" and c,
        timeout=20, what="Degraded with the kubelet's words",
    )  # fmt: skip
    assert "router: 1 pod failing" in degraded["message"] and WORDS in degraded["message"], degraded

    def warnings() -> list[dict[str, Any]]:
        items = get_json(kubectl, "events", "-n", namespace)["items"]
        return [e for e in items if e["involvedObject"]["name"] == "stuck" and e["type"] == "Warning"
                and WORDS in e.get("message", "")]  # fmt: skip

    assert wait_for(warnings, timeout=20, what="the Warning Event")
    _container_state(kubectl, namespace, pod, {"running": {"startedAt": "2026-01-01T00:00:00Z"}})
    wait_for(lambda: _condition(kubectl, namespace, "Degraded").get("status") == "False", timeout=20,
             what="Degraded cleared once the container runs")  # fmt: skip
