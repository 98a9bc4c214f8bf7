"""spec.model.cache on the real control plane: the claim binds (the PV controller), the fill Job runs (the
Job controller; kwok completes its pod), the pools wait at 0 replicas until it completes and then mount
the claim read-only; a new revision is filled by a new Job while pods serve the old one.

The claim's StorageClass exists only as a name: each test makes a static ReadWriteMany PersistentVolume
of that class when it wants the claim bound, so the test decides when the fill can start.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
import yaml
from kvrelay_envtest import example, get_json, wait_for

pytestmark = pytest.mark.controlplane

ROLES = ("prefill", "decode", "router")
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def model(name: str, storage_class: str, revision: str | None = None) -> dict[str, Any]:
    cr = copy.deepcopy(yaml.safe_load(example("tiny.yaml")))
    cr["metadata"]["name"] = name
    cr["spec"]["model"] = {
        "source": SOURCE, "maxModelLen": 512,
        "cache": {"size": "1Gi", "storageClassName": storage_class},
        **({"revision": revision} if revision else {}),
    }  # fmt: skip
    return cr


def static_volume(kubectl, storage_class: str) -> str:
    name = f"pv-{uuid.uuid4().hex[:8]}"
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteMany"],
                 "storageClassName": storage_class, "hostPath": {"path": f"/tmp/{name}"}},
    }  # fmt: skip
    kubectl("apply", "-f", "-", stdin=json.dumps(pv), check=True)
    return name


def replicas(kubectl, namespace: str, name: str) -> list[int]:
    return [
        get_json(kubectl, "deployment", f"{name}-{r}", "-n", namespace)["spec"]["replicas"] for r in ROLES
    ]


def cache_status(kubectl, namespace: str, name: str) -> dict[str, Any]:
    status = get_json(kubectl, "disaggregatedmodel", name, "-n", namespace).get("status") or {}
    condition = next((c for c in status.get("conditions") or [] if c["type"] == "ModelCacheReady"), {})
    return {**(status.get("modelCache") or {}), "condition": condition}


def jobs(kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name},kvrelay.dev/role=model-cache"
    return get_json(kubectl, "jobs", "-n", namespace, "-l", selector)["items"]


def pod_model_args(kubectl, namespace: str, name: str, role: str) -> tuple[list[str], list[dict], list[dict]]:
    pod = get_json(kubectl, "deployment", f"{name}-{role}", "-n", namespace)["spec"]["template"]["spec"]
    main = pod["containers"][0]
    return main["args"], main["volumeMounts"], pod["volumes"]


def test_pools_wait_for_the_fill_then_mount_the_cache(kubectl, namespace: str, operator) -> None:  # type: ignore[no-untyped-def]
    storage_class = f"rwx-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(model("cached", storage_class)), check=True)
    # No volume of that class yet: the claim stays Pending, the fill's pod cannot be placed.
    job = wait_for(lambda: (jobs(kubectl, namespace, "cached") or [None])[0], timeout=30, what="the fill Job")
    key = job["metadata"]["labels"]["kvrelay.dev/model-cache-key"]
    claim = get_json(kubectl, "pvc", "cached-model-cache", "-n", namespace)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["status"]["phase"] == "Pending"
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["hf", "download", SOURCE]
    wait_for(lambda: cache_status(kubectl, namespace, "cached").get("phase") == "Filling", timeout=30)
    condition = cache_status(kubectl, namespace, "cached")["condition"]
    assert condition["status"] == "False" and condition["reason"] == "Filling", condition
    assert replicas(kubectl, namespace, "cached") == [0, 0, 0]  # nothing to load yet
    # The volume appears: the claim binds, the fill runs and completes, the pools start.
    pv = static_volume(kubectl, storage_class)
    try:
        wait_for(lambda: cache_status(kubectl, namespace, "cached").get("phase") == "Ready", timeout=90,
                 what="the fill to complete")  # fmt: skip
        assert cache_status(kubectl, namespace, "cached")["readyKey"] == key
        assert cache_status(kubectl, namespace, "cached")["condition"]["status"] == "True"
        wait_for(lambda: replicas(kubectl, namespace, "cached") == [1, 1, 1], timeout=30, what="the pools")
        for role in ROLES:
            args, mounts, volumes = pod_model_args(kubectl, namespace, "cached", role)
            assert f"/models/{key}" in args, args
            assert {"name": "model", "mountPath": "/models", "readOnly": True} in mounts
            claim_ref = {"claimName": "cached-model-cache", "readOnly": True}
            assert {"name": "model", "persistentVolumeClaim": claim_ref} in volumes
        done = [e for e in get_json(kubectl, "events", "-n", namespace)["items"]
                if e["involvedObject"]["name"] == "cached" and e["reason"] == "Filled"]  # fmt: skip
        assert done, "a Normal event announces the filled cache"

        # A new revision: a new Job fills its own key; pods then move to it and the old Job goes.
        patch = json.dumps({"spec": {"model": {"revision": "v2"}}})
        kubectl(
            "patch", "disaggregatedmodel", "cached", "-n", namespace, "--type=merge", "-p", patch, check=True
        )

        def moved() -> bool:
            status = cache_status(kubectl, namespace, "cached")
            return status.get("phase") == "Ready" and status.get("readyKey") not in (None, key)

        wait_for(moved, timeout=90, what="the second fill")
        new_key = cache_status(kubectl, namespace, "cached")["readyKey"]
        wait_for(lambda: f"/models/{new_key}" in pod_model_args(kubectl, namespace, "cached", "decode")[0],
                 timeout=30, what="pods to move to the new key")  # fmt: skip
        wait_for(lambda: [j["metadata"]["labels"]["kvrelay.dev/model-cache-key"]
                          for j in jobs(kubectl, namespace, "cached")] == [new_key],
                 timeout=30, what="the old fill Job to be pruned")  # fmt: skip
        assert replicas(kubectl, namespace, "cached") == [1, 1, 1]
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false")
        kubectl("delete", "pv", pv, "--wait=false")
