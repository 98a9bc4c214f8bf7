"""Test 3: invalid DisaggregatedModels are refused by the API server itself, naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kvrelay_envtest import get_json

pytestmark = pytest.mark.controlplane


def _cr(name: str, spec: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "kvrelay.dev/v1alpha1", "kind": "DisaggregatedModel",
                       "metadata": {"name": name}, "spec": spec})  # fmt: skip


MODEL = {"source": "org/model"}
# (case id, spec, text the API server's refusal must contain: the field path)
INVALID = [
    ("wrong-type", {"model": MODEL, "prefill": {"replicas": "two"}}, "spec.prefill.replicas"),
    ("negative-replicas", {"model": MODEL, "decode": {"replicas": -1}}, "spec.decode.replicas"),
    ("min-over-max", {"model": MODEL, "prefill": {"minReplicas": 5, "maxReplicas": 2, "replicas": 2}},
     "spec.prefill.minReplicas"),
    ("replicas-over-max", {"model": MODEL, "decode": {"replicas": 9, "maxReplicas": 4}},
     "spec.decode.replicas"),
    ("decode-tp-below-prefill",
     {"model": MODEL, "prefill": {"tensorParallel": 4}, "decode": {"tensorParallel": 2}},
     "spec.decode.tensorParallel"),
    ("unknown-backend", {"model": MODEL, "kvTransfer": {"backend": "ucx"}}, "spec.kvTransfer.backend"),
    ("unknown-mode", {"model": MODEL, "autoscaling": {"mode": "sometimes"}}, "spec.autoscaling.mode"),
    ("missing-model", {"prefill": {"replicas": 1}}, "spec.model"),
    ("empty-source", {"model": {"source": ""}}, "spec.model.source"),
    ("ratio-min-over-max", {"model": MODEL, "autoscaling": {"ratio": {"min": 4, "max": 1}}},
     "spec.autoscaling.ratio.min"),
    ("budget-below-minimums",
     {"model": MODEL, "prefill": {"tensorParallel": 2}, "decode": {"tensorParallel": 2},
      "autoscaling": {"gpuBudget": 3}},
     "spec.autoscaling.gpuBudget"),
    ("zero-tp", {"model": MODEL, "prefill": {"tensorParallel": 0}}, "spec.prefill.tensorParallel"),
    ("unknown-service-type", {"model": MODEL, "router": {"serviceType": "Ingress"}},
     "spec.router.serviceType"),
    ("rdma-without-nixl", {"model": MODEL, "kvTransfer": {"backend": "tcp", "transport": "rdma"}},
     "spec.kvTransfer.transport"),
    ("unknown-dtype", {"model": {"source": "org/model", "dtype": "int3"}}, "spec.model.dtype"),
    ("unknown-field", {"model": MODEL, "prefill": {"replicaz": 1}}, "replicaz"),
]  # fmt: skip


def test_the_invalid_cases_cover_at_least_ten_refusals() -> None:
    assert len(INVALID) >= 10
    assert len({case for case, _, _ in INVALID}) == len(INVALID), "case ids must be unique"


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_cr_is_refused_naming_the_field(
    kubectl, namespace, operator, case: str, spec: dict[str, Any], field: str
) -> None:
    result = kubectl("apply", "-n", namespace, "-f", "-", stdin=_cr(case, spec))
    assert result.returncode != 0, f"{case} was accepted"
    assert field in result.stderr, f"{case}: {field!r} not in {result.stderr!r}"
    # Refused by the API server (admission), so nothing exists and the operator created nothing.
    assert get_json(kubectl, "dm", "-n", namespace)["items"] == []
    children = get_json(
        kubectl, "deployments,services,configmaps", "-n", namespace, "-l", "app.kubernetes.io/name=kvrelay"
    )
    assert children["items"] == []
