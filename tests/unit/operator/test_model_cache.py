"""spec.model.cache: the claim and fill Job rendered, the pools gated on the first fill, pods moved to a
new key only once it is filled, the fallback after a failed fill, and the status and its patch."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from kvrelay_operator import api, resources, status
from kvrelay_operator.resources import RenderContext

CTX = RenderContext(name="m", namespace="ns", uid="uid-1", default_image="reg/kvrelay:1")
CACHE = {"size": "40Gi", "storageClassName": "efs-rwx"}


def spec(source: str = "org/model", **model: Any) -> api.DisaggregatedModelSpec:
    return api.DisaggregatedModelSpec.model_validate(
        {"model": {"source": source, "cache": CACHE, **model}, "prefill": {"replicas": 2}}
    )


def children(s: api.DisaggregatedModelSpec, st: api.DisaggregatedModelStatus) -> dict[tuple[str, str], Any]:
    return {(c["kind"], c["metadata"]["name"]): c for c in resources.render_children(s, st, CTX)}


def deployment(kids: dict[tuple[str, str], Any], role: str) -> dict[str, Any]:
    return kids[("Deployment", f"m-{role}")]


def cache_status(
    s: api.DisaggregatedModelSpec, phase: str, ready: str | None
) -> api.DisaggregatedModelStatus:
    key = resources.cache_key(s.model)
    return api.DisaggregatedModelStatus(
        model_cache=api.ModelCacheStatus(key=key, phase=phase, ready_key=ready)
    )


def test_claim_and_fill_job_are_rendered_and_valid() -> None:
    s = spec(revision="v2")
    kids = children(s, api.DisaggregatedModelStatus())
    claim = kids[("PersistentVolumeClaim", "m-model-cache")]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "40Gi"}},
        "storageClassName": "efs-rwx",
    }
    (job,) = [c for (kind, _), c in kids.items() if kind == "Job"]
    key = resources.cache_key(s.model)
    assert job["metadata"]["labels"][resources.LABEL_CACHE_KEY] == key and len(job["metadata"]["name"]) <= 63
    fill = job["spec"]["template"]["spec"]["containers"][0]
    assert fill["command"] == [
        "hf",
        "download",
        "org/model",
        "--local-dir",
        f"/models/{key}",
        "--revision",
        "v2",
    ]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "m-model-cache"
    }
    pod_security = job["spec"]["template"]["spec"]["securityContext"]
    assert (
        pod_security["runAsNonRoot"] is True and fill["securityContext"]["allowPrivilegeEscalation"] is False
    )
    for child in (claim, job):
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        kubernetes_validate.validate(child, kubernetes_validate.latest_version(), strict=True)
    # another image is another Job (its template is immutable); the same source keeps the same key
    other = resources.render_children(
        s.model_copy(update={"image": "reg/kvrelay:2"}), api.DisaggregatedModelStatus(), CTX
    )
    (job2,) = [c for c in other if c["kind"] == "Job"]
    assert job2["metadata"]["name"] != job["metadata"]["name"]
    assert job2["metadata"]["labels"][resources.LABEL_CACHE_KEY] == key


def test_pools_wait_for_the_first_fill_then_mount_the_claim_read_only() -> None:
    s = spec()
    key = resources.cache_key(s.model)
    for st in (api.DisaggregatedModelStatus(), cache_status(s, "Filling", None)):
        kids = children(s, st)
        assert [deployment(kids, r)["spec"]["replicas"] for r in api.ROLES] == [0, 0, 0]
    kids = children(s, cache_status(s, "Ready", key))
    assert [deployment(kids, r)["spec"]["replicas"] for r in api.ROLES] == [2, 1, 1]
    for role in api.ROLES:
        pod = deployment(kids, role)["spec"]["template"]["spec"]
        assert "initContainers" not in pod  # no per-pod download
        assert {
            "name": "model",
            "persistentVolumeClaim": {"claimName": "m-model-cache", "readOnly": True},
        } in pod["volumes"]
        main = pod["containers"][0]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in main["volumeMounts"]
        assert f"/models/{key}" in main["args"]


def test_a_new_source_is_filled_while_pods_serve_the_last_one() -> None:
    old = spec("org/old")
    old_key = resources.cache_key(old.model)
    new = spec("org/new")
    # the reconcile of the new source: status moves to the new key, Filling, keeping the ready one
    st = status.compute_status(new, cache_status(old, "Ready", old_key), {}, 2, "http://x", "t0")
    assert st.model_cache == api.ModelCacheStatus(
        key=resources.cache_key(new.model), phase="Filling", ready_key=old_key
    )
    cond = next(c for c in st.conditions if c.type == "ModelCacheReady")
    assert cond.status == "False" and cond.reason == "Filling" and f"pods serve {old_key}" in cond.message
    kids = children(new, st)
    assert deployment(kids, "decode")["spec"]["replicas"] == 1
    assert (
        f"/models/{old_key}"
        in deployment(kids, "decode")["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    (job,) = [c for (kind, _), c in kids.items() if kind == "Job"]
    assert job["metadata"]["labels"][resources.LABEL_CACHE_KEY] == resources.cache_key(new.model)
    # its Job completes: pods move to the new key
    assert st.model_cache is not None
    done = status.cache_status_from_job(
        st.model_cache, {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    )
    assert done.phase == "Ready" and done.ready_key == done.key
    moved = children(new, st.model_copy(update={"model_cache": done}))
    assert (
        f"/models/{done.key}"
        in deployment(moved, "decode")["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_a_failed_first_fill_falls_back_to_per_pod_downloads() -> None:
    s = spec()
    reached = "Job has reached the specified backoff limit"
    failed_job = {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": reached}
    ]}}  # fmt: skip
    start = api.ModelCacheStatus(key=resources.cache_key(s.model), phase="Filling")
    failed = status.cache_status_from_job(start, failed_job)
    assert failed.phase == "Failed" and failed.ready_key is None
    assert failed.message == "BackoffLimitExceeded: Job has reached the specified backoff limit"
    kids = children(s, api.DisaggregatedModelStatus(model_cache=failed))
    decode = deployment(kids, "decode")["spec"]
    assert decode["replicas"] == 1
    assert [c["name"] for c in decode["template"]["spec"]["initContainers"]] == ["download-model"]
    st = status.with_model_cache(api.DisaggregatedModelStatus(), failed, "t0", 1)
    (cond,) = [c for c in st.conditions if c.type == "ModelCacheReady"]
    assert cond.reason == "FillFailed" and "pods download the checkpoint themselves" in cond.message
    events = status.condition_events(api.DisaggregatedModelStatus(), st)
    assert ("Warning", "FillFailed") in [(t, r) for t, r, _ in events]
    filling = status.with_model_cache(api.DisaggregatedModelStatus(), start, "t0", 1)
    assert status.condition_events(api.DisaggregatedModelStatus(), filling) == []  # progress, not trouble


def test_status_patch_removes_what_went_away() -> None:
    s = spec()
    failed = api.DisaggregatedModelStatus(
        model_cache=api.ModelCacheStatus(key="k", phase="Failed", message="boom")
    )
    refill = api.DisaggregatedModelStatus(model_cache=api.ModelCacheStatus(key="k2", phase="Filling"))
    assert status.status_merge_patch(failed, refill) == {
        "modelCache": {"key": "k2", "phase": "Filling", "message": None}
    }
    assert status.status_merge_patch(refill, api.DisaggregatedModelStatus()) == {"modelCache": None}
    assert status.status_merge_patch(refill, refill) == {}
    assert s.model.cache is not None


@pytest.mark.parametrize("source", ["pvc://claim/path", "/opt/models/m"])
def test_cache_is_only_for_hugging_face_sources(source: str) -> None:
    with pytest.raises(ValueError, match=r"model\.cache applies to Hugging Face sources"):
        spec(source)
