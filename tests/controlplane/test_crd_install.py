"""Test 1: the CRDs install with a real `kubectl apply -f crds/` and `kubectl explain` shows the docs."""

from __future__ import annotations

import pytest
from kvrelay_envtest import REPO_ROOT, get_json, wait_for

pytestmark = pytest.mark.controlplane


def test_crds_apply_and_explain(kubectl, crds) -> None:
    again = kubectl("apply", "-f", str(REPO_ROOT / "crds"), check=True)
    assert "disaggregatedmodels.kvrelay.dev" in again.stdout

    crd = get_json(kubectl, "crd", "disaggregatedmodels.kvrelay.dev")
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established["Established"] == "True" and established["NamesAccepted"] == "True"

    def explain(field: str) -> str:
        result = kubectl("explain", field)
        return result.stdout if result.returncode == 0 else ""

    # Discovery may lag the Established condition by a moment.
    text = wait_for(lambda: explain("disaggregatedmodels.spec.prefill"), timeout=20, what="kubectl explain")
    assert "tensorParallel" in text and "GPUs per replica (tensor parallel degree)," in text
    assert "Replicas, unless autoscaling.mode is auto" in text
    kv = explain("dm.spec.kvTransfer.failurePolicy")
    assert "recompute the prompt on decode, or fail" in kv and "recompute" in kv
    lease = explain("dm.spec.kvTransfer.leaseSeconds")  # the admission checks are in the docs
    assert "Admission: 1 to 3600; leaseSeconds must be > timeoutSeconds" in " ".join(lease.split())
    status = explain("dm.status.autoscaler")
    assert "lastDecisionTime" in status and "Metric values the decision used." in status


def test_printer_columns(kubectl, namespace) -> None:
    manifest = """
apiVersion: kvrelay.dev/v1alpha1
kind: DisaggregatedModel
metadata: {name: cols}
spec: {model: {source: /models/tiny}}
"""
    kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest, check=True)
    header = kubectl("get", "dm", "-n", namespace, check=True).stdout.splitlines()[0].split()
    assert header == [
        "NAME",
        "PREFILL-READY",
        "PREFILL-DESIRED",
        "DECODE-READY",
        "DECODE-DESIRED",
        "PHASE",
        "AGE",
    ]
