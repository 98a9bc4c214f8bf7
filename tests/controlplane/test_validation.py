"""Test 3: invalid DisaggregatedModels are refused by the API server itself, naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kvrelay_envtest import get_json
from kvrelay_operator import api
from pydantic import ValidationError

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
    # Neither one node's worth nor a whole number of nodes: the refusal names both numbers.
    ("tp-not-a-multiple-of-node",
     {"model": MODEL, "prefill": {"tensorParallel": 12, "gpusPerNode": 8, "maxReplicas": 2}},
     "tensorParallel (12) with gpusPerNode (8)"),
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
    # Specs that used to be accepted and fail later, where a user has to dig for the cause.
    ("gpu-in-resources", {"model": MODEL, "prefill": {"resources": {"limits": {"nvidia.com/gpu": 8}}}},
     "GPUs come from tensorParallel"),
    ("rdma-in-resources", {"model": MODEL, "decode": {"resources": {"requests": {"rdma/ib": 1}}}},
     "spec.decode.resources"),
    ("quantity-not-a-quantity", {"model": MODEL, "prefill": {"resources": {"requests": {"memory": "16GB"}}}},
     "spec.prefill.resources.requests.memory"),
    ("negative-quantity", {"model": MODEL, "decode": {"resources": {"limits": {"cpu": -2}}}},
     "spec.decode.resources.limits.cpu"),
    ("request-above-limit",
     {"model": MODEL, "router": {"resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "2000m"}}}},
     "each resource request must be <= its limit"),
    ("resource-name-with-space", {"model": MODEL, "decode": {"resources": {"requests": {"gpu count": 1}}}},
     "resource name"),
    ("image-uppercase-repository", {"model": MODEL, "image": "MyOrg/Worker:latest"}, "spec.image"),
    ("image-with-url-scheme", {"model": MODEL, "image": "https://ghcr.io/org/worker:1"}, "spec.image"),
    ("image-empty-tag", {"model": MODEL, "image": "ghcr.io/org/worker:"}, "spec.image"),
    ("pvc-without-claim", {"model": {"source": "pvc:///models/llama"}}, "spec.model.source"),
    ("pvc-path-leaves-claim", {"model": {"source": "pvc://models/../secrets"}}, "spec.model.source"),
    ("unknown-source-scheme", {"model": {"source": "s3://bucket/llama"}}, "spec.model.source"),
    ("prometheus-url-without-scheme", {"model": MODEL, "autoscaling": {"prometheusUrl": "prometheus:9090"}},
     "spec.autoscaling.prometheusUrl"),
    ("lease-shorter-than-fetch-timeout",
     {"model": MODEL, "kvTransfer": {"leaseSeconds": 5, "timeoutSeconds": 10}},
     "spec.kvTransfer.leaseSeconds"),
    ("cooldown-shorter-than-interval",
     {"model": MODEL, "autoscaling": {"intervalSeconds": 60, "scaleUpCooldownSeconds": 30}},
     "spec.autoscaling.scaleUpCooldownSeconds"),
    ("toleration-exists-with-value",
     {"model": MODEL, "prefill": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "h100"}]}},
     "takes no value"),
    ("toleration-seconds-without-noexecute",
     {"model": MODEL,
      "decode": {"tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 5}]}},
     "tolerationSeconds needs effect NoExecute"),
    ("toleration-without-key-or-exists", {"model": MODEL, "router": {"tolerations": [{"value": "x"}]}},
     "must use operator Exists"),
    ("node-selector-bad-value", {"model": MODEL, "decode": {"nodeSelector": {"pool": "h100 nodes"}}},
     "spec.decode.nodeSelector.pool"),
    ("node-selector-bad-key", {"model": MODEL, "prefill": {"nodeSelector": {"gpu pool": "h100"}}},
     "label key"),
    ("secret-name-not-dns", {"model": MODEL, "router": {"apiKeySecret": {"name": "My_Secret"}}},
     "spec.router.apiKeySecret.name"),
    ("env-name-with-equals", {"model": MODEL, "prefill": {"env": [{"name": "A=B", "value": "x"}]}},
     "spec.prefill.env[0].name"),
    ("rdma-resource-without-domain", {"model": MODEL, "kvTransfer": {"rdma": {"resourceName": "ib"}}},
     "spec.kvTransfer.rdma.resourceName"),
]  # fmt: skip

# Names whose children could not be created: a Service name is a DNS-1035 label of <= 63 characters.
INVALID_NAMES = ["a" * 56, "llama.3-8b", "3b-model"]

# Edge cases of the same fields that must still be accepted (no check may refuse a working spec).
VALID = {
    "image-forms": {"model": MODEL, "image": "localhost:5000/kvrelay/worker-dev:v0.1.0_rc1"},
    "image-digest": {"model": MODEL, "image": "ghcr.io/org/worker@sha256:" + "0" * 64},
    "pvc-root": {"model": {"source": "pvc://models"}},
    "pvc-gguf": {"model": {"source": "pvc://models.cache/smollm2/model.Q8_0.gguf"}},
    "image-path": {"model": {"source": "/models/tiny"}},
    "hf-repo": {"model": {"source": "meta-llama/Llama-3.1-8B-Instruct"}},
    "resources": {"model": MODEL, "prefill": {"resources": {
        "requests": {"cpu": 4, "memory": "16Gi", "hugepages-2Mi": "1Gi", "example.com/fpga": 1},
        "limits": {"cpu": "4", "memory": "17179869184"}}}},
    "tolerations": {"model": MODEL, "decode": {"tolerations": [
        {"operator": "Exists"}, {"key": "gpu", "operator": "Equal", "value": "l40s", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 30}]}},
    "node-selector": {"model": MODEL, "prefill": {"nodeSelector": {
        "node.kubernetes.io/instance-type": "p5.48xlarge", "pool": ""}}},
    "timings": {"model": MODEL, "kvTransfer": {"leaseSeconds": 11, "timeoutSeconds": 10},
                "autoscaling": {"intervalSeconds": 600, "scaleUpCooldownSeconds": 0,
                                "scaleDownCooldownSeconds": 60, "prometheusUrl": "https://prom.example.com/x"}},
    "long-interval-default-cooldown": {"model": MODEL, "autoscaling": {"intervalSeconds": 3600}},
    # Decode TP below prefill TP: each decode rank reads from several prefill ranks (issue 15).
    "decode-tp-below-prefill": {"model": MODEL, "prefill": {"tensorParallel": 2},
                                "decode": {"tensorParallel": 1}},
    "prefill-tp4-decode-tp2": {"model": MODEL, "prefill": {"tensorParallel": 4},
                               "decode": {"tensorParallel": 2}},
    "prefill-spans-two-nodes": {"model": MODEL, "prefill": {"tensorParallel": 16, "gpusPerNode": 8},
                                "decode": {"tensorParallel": 1}},
    "tp-below-a-small-node": {"model": MODEL, "decode": {"tensorParallel": 3, "gpusPerNode": 4}},
}  # fmt: skip


def test_the_invalid_cases_cover_at_least_ten_refusals() -> None:
    assert len(INVALID) >= 10
    assert len({case for case, _, _ in INVALID}) == len(INVALID), "case ids must be unique"


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_cr_is_refused_naming_the_field(
    kubectl, namespace, operator, case: str, spec: dict[str, Any], field: str
) -> None:
    # The operator's own parsing refuses the same spec (the CRD is generated from these models).
    with pytest.raises(ValidationError):
        api.DisaggregatedModelSpec.model_validate(spec)
    result = kubectl("apply", "-n", namespace, "-f", "-", stdin=_cr(case, spec))
    assert result.returncode != 0, f"{case} was accepted"
    assert field in result.stderr, f"{case}: {field!r} not in {result.stderr!r}"
    # Refused by the API server (admission), so nothing exists and the operator created nothing.
    assert get_json(kubectl, "dm", "-n", namespace)["items"] == []
    children = get_json(
        kubectl, "deployments,services,configmaps", "-n", namespace, "-l", "app.kubernetes.io/name=kvrelay"
    )
    assert children["items"] == []


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_name_whose_children_cannot_exist_is_refused(kubectl, namespace, name: str) -> None:
    assert api.name_problem(name) is not None
    result = kubectl(
        "apply", "-n", namespace, "--dry-run=server", "-f", "-", stdin=_cr(name, {"model": MODEL})
    )
    assert result.returncode != 0, f"{name!r} was accepted"
    assert "metadata.name must be a DNS-1035 label of at most 55 characters" in result.stderr


@pytest.mark.parametrize("case", VALID)
def test_edge_cases_of_checked_fields_are_accepted(kubectl, namespace, case: str) -> None:
    api.DisaggregatedModelSpec.model_validate(VALID[case])
    result = kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-", stdin=_cr(case, VALID[case]))
    assert result.returncode == 0, result.stderr
    longest = "a" * 55
    assert api.name_problem(longest) is None
    assert kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-",
                   stdin=_cr(longest, VALID[case])).returncode == 0  # fmt: skip
