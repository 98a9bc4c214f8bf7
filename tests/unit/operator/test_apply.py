"""apply.py: which children are sent, from what the operator applied or finds live (no cluster).

A recording stand-in for KubeClient plays the API server: it keeps the objects applied to it and
answers labelled LISTs from them, as server-side apply and LIST would.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kvrelay_operator import apply, resources


class RecordingKube:
    """Objects by (namespace, Kind/name); every call counted by verb."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: Counter[str] = Counter()
        self.fail_with: ApiException | None = None

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.requests["PATCH"] += 1
        if self.fail_with is not None:
            raise self.fail_with
        key = (manifest["metadata"]["namespace"], apply.child_key(manifest))
        self.objects[key] = json.loads(json.dumps(manifest))
        return self.objects[key]

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        self.requests["DELETE"] += 1
        if (namespace, f"{kind}/{name}") not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return self.objects.pop((namespace, f"{kind}/{name}"))

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self.requests["GET"] += 1
        name, _, value = label_selector.partition("=")
        return [
            {k: v for k, v in o.items() if k != "kind"}  # the API's list items carry no kind
            for (ns, _), o in self.objects.items()
            if ns == namespace and o["kind"] == kind and o["metadata"]["labels"].get(name) == value
        ]


def children(name: str, replicas: int = 1, image: str = "img:1") -> list[dict[str, Any]]:
    labels = resources.labels(name, "decode")
    meta = {"name": f"{name}-decode", "namespace": "ns", "labels": labels}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": replicas, "template": {"spec": {"image": image}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"clusterIP": "None"}},
    ]  # fmt: skip


# LISTs a resume sends per namespace: the rendered kinds here (Deployment, Service) and every pruned kind
# (Deployment is one of those too)
LISTS = len({"Deployment", "Service"} | set(apply.PRUNED_KINDS))


def test_hash_changes_with_content_and_fingerprint_with_replicas() -> None:
    deployment = children("m")[0]
    a = apply.with_hash(deployment)
    b = apply.with_hash({**deployment, "spec": {"replicas": 2}})
    assert (
        a["metadata"]["annotations"][apply.HASH_ANNOTATION]
        != b["metadata"]["annotations"][apply.HASH_ANNOTATION]
    )
    assert apply.with_hash(deployment) == a  # deterministic
    assert apply.fingerprint(a).endswith("/1") and apply.fingerprint(b).endswith("/2")
    assert "annotations" not in deployment["metadata"]  # the input is not mutated


def test_unchanged_children_are_not_sent_again() -> None:
    kube = RecordingKube()
    applier = apply.ChildApplier(kube)  # type: ignore[arg-type]
    assert set(applier.apply_changed("ns", "m", children("m"), fresh=True)) == {
        "Deployment/m-decode", "Service/m-decode",
    }  # fmt: skip
    assert applier.apply_changed("ns", "m", children("m")) == {}
    assert set(applier.apply_changed("ns", "m", children("m", image="img:2"))) == {"Deployment/m-decode"}
    assert kube.requests == {"PATCH": 3}  # nothing listed: the operator applied them itself


def test_after_a_restart_live_children_answer_and_one_list_per_kind_serves_all_models() -> None:
    kube = RecordingKube()
    before = apply.ChildApplier(kube)  # type: ignore[arg-type]
    for name in ("a", "b", "c"):
        before.apply_changed("ns", name, children(name), fresh=True)
    kube.objects[("ns", "Deployment/b-decode")]["spec"]["replicas"] = 5  # kubectl scale while away
    kube.requests.clear()

    now = [0.0]
    after = apply.ChildApplier(kube, clock=lambda: now[0])  # type: ignore[arg-type]
    changed = {name: set(after.apply_changed("ns", name, children(name))) for name in ("a", "b", "c")}
    assert changed == {"a": set(), "b": {"Deployment/b-decode"}, "c": set()}
    # Deployments + Services + the PRUNED_KINDS (always looked up), once for three models.
    assert kube.requests == {"GET": LISTS, "PATCH": 1}

    now[0] += apply.LIVE_CACHE_SECONDS + 1
    after.apply_changed("ns", "d", children("d"))  # a later resume re-reads
    assert kube.requests["GET"] == 2 * LISTS


@pytest.mark.parametrize(("status", "refused"), [(422, True), (400, True), (500, False), (409, False)])
def test_api_errors_are_classified_and_forget_what_was_applied(status: int, refused: bool) -> None:
    kube = RecordingKube()
    applier = apply.ChildApplier(kube)  # type: ignore[arg-type]
    applier.apply_changed("ns", "m", children("m"), fresh=True)
    kube.fail_with = ApiException(status=status, reason="Nope")
    kube.fail_with.body = json.dumps({"kind": "Status", "message": "env A=B is invalid"})
    with pytest.raises(apply.ApplyError) as raised:
        applier.apply_changed("ns", "m", children("m", replicas=2))
    assert raised.value.refused is refused and raised.value.detail == "env A=B is invalid"
    kube.fail_with = None
    kube.requests.clear()
    # Forgotten: the next attempt compares against the live children again.
    assert set(applier.apply_changed("ns", "m", children("m", replicas=2))) == {"Deployment/m-decode"}
    assert kube.requests == {"GET": LISTS, "PATCH": 1}


def policy(name: str) -> dict[str, Any]:
    meta = {"name": f"{name}-decode", "namespace": "ns", "labels": resources.labels(name, "decode")}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": {"podSelector": {}}}  # fmt: skip


def test_a_network_policy_no_longer_rendered_is_deleted() -> None:
    kube = RecordingKube()
    applier = apply.ChildApplier(kube)  # type: ignore[arg-type]
    applier.apply_changed("ns", "m", [*children("m"), policy("m")], fresh=True)
    applier.apply_changed("ns", "o", [*children("o"), policy("o")], fresh=True)
    kube.requests.clear()
    assert applier.apply_changed("ns", "m", children("m")) == {}  # the switch turned off: nothing to apply
    assert kube.requests == {"DELETE": 1}
    assert ("ns", "NetworkPolicy/m-decode") not in kube.objects
    assert ("ns", "NetworkPolicy/o-decode") in kube.objects, "another model's policy stays"
    assert applier.apply_changed("ns", "m", children("m")) == {}
    assert kube.requests == {"DELETE": 1}, "deleted once, then forgotten"
    # Back on: applied again.
    assert set(applier.apply_changed("ns", "m", [*children("m"), policy("m")])) == {"NetworkPolicy/m-decode"}


def test_a_network_policy_turned_off_while_the_operator_was_away_is_deleted_on_resume() -> None:
    kube = RecordingKube()
    apply.ChildApplier(kube).apply_changed("ns", "m", [*children("m"), policy("m")], fresh=True)  # type: ignore[arg-type]
    kube.requests.clear()
    after = apply.ChildApplier(kube)  # type: ignore[arg-type]
    assert after.apply_changed("ns", "m", children("m")) == {}
    assert kube.requests == {"GET": LISTS, "DELETE": 1}
    assert ("ns", "NetworkPolicy/m-decode") not in kube.objects
    # Only PRUNED_KINDS go: a Service no longer rendered is left to the garbage collector.
    assert apply.stale_children(["Service/m-decode", "NetworkPolicy/m-x"], set()) == ["NetworkPolicy/m-x"]


def test_deleting_a_policy_already_gone_is_fine_and_other_errors_forget() -> None:
    kube = RecordingKube()
    applier = apply.ChildApplier(kube)  # type: ignore[arg-type]
    applier.apply_changed("ns", "m", [*children("m"), policy("m")], fresh=True)
    del kube.objects[("ns", "NetworkPolicy/m-decode")]  # deleted by hand meanwhile: 404
    assert applier.apply_changed("ns", "m", children("m")) == {}
    applier.apply_changed("ns", "m", [*children("m"), policy("m")])
    delete = kube.delete

    def forbidden(*args: str) -> dict[str, Any]:
        raise ApiException(status=403, reason="Forbidden")

    kube.delete = forbidden  # type: ignore[method-assign]
    with pytest.raises(apply.ApplyError) as raised:
        applier.apply_changed("ns", "m", children("m"))
    assert raised.value.status == 403 and not raised.value.refused
    kube.delete, kube.requests = delete, Counter()  # type: ignore[method-assign]
    # Forgotten: the next attempt compares against the live children, and deletes then.
    assert applier.apply_changed("ns", "m", children("m")) == {}
    assert kube.requests == {"GET": LISTS, "DELETE": 1}


class NoLeaderWorkerSets(RecordingKube):
    """A cluster without the LeaderWorkerSet CRD: its collection answers 404."""

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        if kind == "LeaderWorkerSet":
            self.requests["GET"] += 1
            raise ApiException(status=404, reason="Not Found")
        return super().list(api_version, kind, namespace, label_selector)


def test_a_resume_where_leader_worker_sets_are_not_served_finds_none_of_them() -> None:
    kube = NoLeaderWorkerSets()
    apply.ChildApplier(kube).apply_changed("ns", "a", children("a"), fresh=True)  # type: ignore[arg-type]
    after = apply.ChildApplier(kube)  # type: ignore[arg-type]
    assert after.apply_changed("ns", "a", children("a")) == {}


def test_a_role_that_becomes_a_leader_worker_set_loses_its_deployment() -> None:
    kube = RecordingKube()
    applier = apply.ChildApplier(kube)  # type: ignore[arg-type]
    applier.apply_changed("ns", "a", children("a"), fresh=True)
    deployment, service = children("a")
    lws = {**deployment, "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
           "metadata": {**deployment["metadata"], "name": "a-decode-lws"}}  # fmt: skip
    changed = applier.apply_changed("ns", "a", [service, lws])
    assert set(changed) == {"LeaderWorkerSet/a-decode-lws"}
    assert ("ns", "Deployment/a-decode") not in kube.objects and kube.requests["DELETE"] == 1
