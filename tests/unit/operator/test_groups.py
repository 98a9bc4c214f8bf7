"""Roles spanning nodes (groups.py, and how resources.py/status.py use it): pure, no cluster."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client.exceptions import ApiException
from kvrelay_operator import api, formats, groups, handlers, resources, status
from kvrelay_operator.apply import ApplyError
from kvrelay_operator.resources import RenderContext

CTX = RenderContext(name="m", namespace="ns", uid="uid-1", default_image="reg/kvrelay:1")
NO_STATUS = api.DisaggregatedModelStatus()
NOW = "2026-01-01T00:00:00Z"


def spec(**over: Any) -> api.DisaggregatedModelSpec:
    return api.DisaggregatedModelSpec.model_validate({"model": {"source": "org/model"}, **over})


def render(s: api.DisaggregatedModelSpec, **ctx: Any) -> dict[tuple[str, str], dict[str, Any]]:
    children = resources.render_children(s, NO_STATUS, CTX.model_copy(update=ctx))
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def flags(args: list[str]) -> dict[str, str]:
    return {a: b for a, b in itertools.pairwise(args) if a.startswith("--")}


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SPANNING = {"tensorParallel": 16, "gpusPerNode": 8, "nodeSelector": {"pool": "h100"},
            "tolerations": [GPU_TOLERATION]}  # fmt: skip


def test_tp_up_to_a_node_stays_a_deployment_with_tp_flags_and_that_many_gpus() -> None:
    children = render(spec(prefill={"tensorParallel": 4}, decode={"tensorParallel": 2}))
    for role, tp in (("prefill", "4"), ("decode", "2")):
        deployment = children[("Deployment", f"m-{role}")]
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        assert flags(c["args"])["--tensor-parallel"] == tp
        assert "--tp-nodes" not in c["args"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == tp
        assert "tp" not in {p["name"] for p in c["ports"]}
        assert groups.LWS_NAME_ENV not in {e["name"] for e in c["env"]}
    assert not any(kind == groups.KIND for kind, _ in children)
    # TP 1 passes no TP flag at all (a worker built before TP keeps working).
    (c,) = render(spec())[("Deployment", "m-decode")]["spec"]["template"]["spec"]["containers"]
    assert "--tensor-parallel" not in c["args"]


def test_tp_above_a_node_becomes_a_leader_worker_set_of_node_sized_pods() -> None:
    s = spec(prefill={**SPANNING, "replicas": 2, "maxReplicas": 4}, decode={"tensorParallel": 1})
    children = render(s)
    assert ("Deployment", "m-prefill") not in children
    assert ("Deployment", "m-decode") in children
    lws = children[(groups.KIND, "m-prefill-lws")]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert lws["metadata"]["labels"]["kvrelay.dev/role"] == "prefill"
    assert lws["metadata"]["ownerReferences"][0]["kind"] == "DisaggregatedModel"
    assert lws["spec"]["replicas"] == 2  # groups: one per replica
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert template["leaderTemplate"] == template["workerTemplate"]
    pod = template["workerTemplate"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"  # a node's worth per pod, 16 in the group
    tp_flags = {k: v for k, v in flags(c["args"]).items() if k.startswith(("--tensor-parallel", "--tp-"))}
    assert tp_flags == {"--tensor-parallel": "16", "--tp-nodes": "2", "--tp-node-rank": "auto",
                        "--tp-leader-addr": "auto", "--tp-port": "29500"}  # fmt: skip
    assert {"name": "tp", "containerPort": 29500, "protocol": "TCP"} in c["ports"]
    assert {"name": groups.LWS_NAME_ENV, "value": "m-prefill-lws"} in c["env"]
    # The same probes (metrics port) serve the leader and the other ranks.
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    # Placement as for a Deployment, and the group's pods on distinct nodes.
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["tolerations"] == SPANNING["tolerations"]
    (required,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert required["labelSelector"]["matchLabels"] == resources.selector_labels("m", "prefill")
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_user_pod_anti_affinity_is_kept_and_one_pod_per_node_added() -> None:
    mine = {"labelSelector": {"matchLabels": {"x": "y"}}, "topologyKey": "zone"}
    s = spec(prefill={**SPANNING, "affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [mine]}}})  # fmt: skip
    pod = render(s)[(groups.KIND, "m-prefill-lws")]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    terms = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0] == mine and terms[1]["topologyKey"] == "kubernetes.io/hostname"


def test_router_discovers_only_group_leaders() -> None:
    children = render(spec(prefill=SPANNING))
    assert children[("Service", "m-prefill")]["spec"]["selector"] == {
        **resources.selector_labels("m", "prefill"), "leaderworkerset.sigs.k8s.io/worker-index": "0"
    }  # fmt: skip
    assert children[("Service", "m-decode")]["spec"]["selector"] == resources.selector_labels("m", "decode")
    # Only ready leaders: the LWS's own Service (named after it) publishes not-ready pods for the ranks.
    assert children[("Service", "m-prefill")]["spec"]["publishNotReadyAddresses"] is False


@pytest.mark.parametrize("k8s_version", ["1.30.0", kubernetes_validate.latest_version()])
def test_network_policy_lets_a_groups_ranks_reach_each_other(k8s_version: str) -> None:
    children = render(spec(prefill=SPANNING))
    ingress = children[("NetworkPolicy", "m-prefill")]["spec"]["ingress"]
    own = {"podSelector": {"matchLabels": resources.selector_labels("m", "prefill")}}
    assert {"from": [own], "ports": [{"protocol": "TCP"}]} in ingress
    decode_own = {"podSelector": {"matchLabels": resources.selector_labels("m", "decode")}}
    assert not any(rule.get("from") == [decode_own] and rule["ports"] == [{"protocol": "TCP"}]
                   for rule in children[("NetworkPolicy", "m-decode")]["spec"]["ingress"])  # fmt: skip
    kubernetes_validate.validate(children[("NetworkPolicy", "m-prefill")], k8s_version, strict=True)


def test_without_leader_worker_sets_a_spanning_role_renders_no_workload() -> None:
    children = render(spec(prefill=SPANNING), leader_worker_set_available=False)
    assert ("Deployment", "m-prefill") not in children
    assert not any(kind == groups.KIND for kind, _ in children)
    assert ("Deployment", "m-decode") in children and ("Service", "m-prefill") in children


def test_pod_template_is_a_valid_core_v1_pod() -> None:
    lws = render(spec(prefill=SPANNING))[(groups.KIND, "m-prefill-lws")]
    template = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]},
           "spec": template["spec"]}  # fmt: skip
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


TP_SECRET_ENV = {"name": "KVRELAY_TP_SECRET",
                 "valueFrom": {"secretKeyRef": {"name": "m-tp-link-uid-1", "key": "secret"}}}  # fmt: skip


def test_every_pod_of_a_group_reads_the_link_key_from_the_models_secret() -> None:
    children = render(spec(prefill=SPANNING, decode={"tensorParallel": 2}))
    template = children[(groups.KIND, "m-prefill-lws")]["spec"]["leaderWorkerTemplate"]
    for which in ("leaderTemplate", "workerTemplate"):
        (c,) = template[which]["spec"]["containers"]
        assert TP_SECRET_ENV in c["env"], which
    # One pod's ranks share a key the worker makes up itself: no Secret for a Deployment's pods.
    for name in ("m-decode", "m-router"):
        (c,) = children[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        assert not any(e["name"] == "KVRELAY_TP_SECRET" for e in c.get("env") or []), name


def test_the_env_name_is_the_one_the_worker_reads() -> None:
    group_py = Path(__file__).resolve().parents[3] / "worker_image" / "kvrelay_worker" / "tp" / "group.py"
    assert f'AUTHKEY_ENV = "{groups.TP_SECRET_ENV}"' in group_py.read_text()


@pytest.mark.parametrize(
    ("prefill", "decode", "wanted"),
    [
        ({"tensorParallel": 8}, {"tensorParallel": 2}, False),  # a node's worth: one pod each
        (SPANNING, {"tensorParallel": 1}, True),
        ({"tensorParallel": 1}, {"tensorParallel": 8, "gpusPerNode": 4}, True),
    ],
)
def test_the_link_secret_is_wanted_only_where_a_role_spans_nodes(
    prefill: dict[str, Any], decode: dict[str, Any], wanted: bool
) -> None:
    secret = resources.tp_link_secret(spec(prefill=prefill, decode=decode), CTX, "ab" * 32)
    assert (secret is not None) == wanted


def test_the_link_secret_manifest() -> None:
    secret = resources.tp_link_secret(spec(prefill=SPANNING), CTX, "ab" * 32)
    assert secret is not None
    assert secret["metadata"]["name"] == TP_SECRET_ENV["valueFrom"]["secretKeyRef"]["name"]
    assert (secret["type"], secret["immutable"]) == ("Opaque", True)
    assert secret["stringData"] == {"secret": "ab" * 32}
    assert secret["metadata"]["labels"] == resources.labels("m")
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("DisaggregatedModel", "m",
                                                                               "uid-1", True)  # fmt: skip
    kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    # The longest model name the CRD admits still gives a valid Secret name (a DNS-1123 subdomain).
    longest = "a" * formats.MAX_NAME_LENGTH
    name = groups.tp_secret_name(longest, "0f8b7c2e-1111-2222-3333-444455556666")
    assert name == f"{longest}-tp-link-0f8b7c2e" and len(name) <= 253
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name)


class CreateOnlyKube:
    """Answers POSTs as a real API server would for a Secret that may already exist."""

    def __init__(self, status: int | None) -> None:
        self.status = status
        self.created: list[dict[str, Any]] = []

    def create(self, manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
        self.created.append(manifest)
        if self.status is not None:
            raise ApiException(status=self.status, reason="x")
        return manifest


class FakeState:
    def __init__(self, kube: CreateOnlyKube) -> None:
        self.kube = kube


@pytest.mark.parametrize("answer", [None, 409])
def test_the_secret_is_created_and_one_that_exists_is_kept(answer: int | None) -> None:
    kube = CreateOnlyKube(answer)
    handlers._maybe_create_tp_secret(FakeState(kube), spec(prefill=SPANNING), CTX)  # type: ignore[arg-type]
    (sent,) = kube.created
    assert sent["kind"] == "Secret" and re.fullmatch(r"[0-9a-f]{64}", sent["stringData"]["secret"])


def test_no_secret_without_a_spanning_role_and_a_refused_one_is_an_apply_error() -> None:
    kube = CreateOnlyKube(None)
    handlers._maybe_create_tp_secret(FakeState(kube), spec(prefill={"tensorParallel": 8}), CTX)  # type: ignore[arg-type]
    assert kube.created == []
    with pytest.raises(ApplyError) as raised:
        handlers._maybe_create_tp_secret(FakeState(CreateOnlyKube(422)), spec(prefill=SPANNING), CTX)  # type: ignore[arg-type]
    assert raised.value.refused


def group_pod(role: str, name: str, node: str | None, lws: str = "m-prefill-lws") -> status.PodScheduling:
    body = {"metadata": {"name": name, "labels": {groups.SET_NAME_LABEL: lws}},
            "spec": {"nodeName": node} if node else {}}  # fmt: skip
    return status.PodScheduling.from_body(body, role)


def test_a_group_partly_scheduled_is_incomplete_and_says_what_would_help() -> None:
    s = spec(prefill={**SPANNING, "replicas": 2, "maxReplicas": 4})
    pods = [
        group_pod("prefill", "m-prefill-lws-0", "n1"), group_pod("prefill", "m-prefill-lws-0-1", "n2"),
        group_pod("prefill", "m-prefill-lws-1", "n3"), group_pod("prefill", "m-prefill-lws-1-1", None),
    ]  # fmt: skip
    assert pods[1].group == "m-prefill-lws-0" and pods[3].group == "m-prefill-lws-1"
    incomplete = status.incomplete_groups_by_role(s, pods)
    assert set(incomplete) == {"prefill"}
    assert incomplete["prefill"].startswith("group m-prefill-lws-1 has 1 of 2 pods scheduled; ")
    assert "does not gang-schedule" in incomplete["prefill"] and "Kueue" in incomplete["prefill"]
    # Whole groups, and a group none of whose pods is placed yet (it holds no GPUs), are not incomplete.
    unplaced = [
        group_pod("prefill", "m-prefill-lws-1", None),
        group_pod("prefill", "m-prefill-lws-1-1", None),
    ]
    whole = [*pods[:2], *unplaced]
    assert status.incomplete_groups_by_role(s, whole) == {}
    # Pods of a Deployment have no group.
    assert (
        status.PodScheduling.from_body({"metadata": {"name": "d"}, "spec": {"nodeName": "n"}}, "decode").group
        is None
    )


def test_group_index_label_wins_over_the_name() -> None:
    body = {
        "metadata": {
            "name": "m-prefill-lws-3-1",
            "labels": {groups.SET_NAME_LABEL: "m-prefill-lws", groups.GROUP_INDEX_LABEL: "3"},
        }
    }
    member = groups.GroupPod.from_body(body, "prefill")
    assert member is not None and member.group == "m-prefill-lws-3"


def test_status_says_incomplete_group_and_missing_leader_worker_set() -> None:
    s = spec(prefill=SPANNING)
    workloads = {r: status.DeploymentState(spec_replicas=1, replicas=1, ready_replicas=1, updated_replicas=1)
                 for r in ("decode", "router")}  # fmt: skip
    lws = {"kind": groups.KIND, "metadata": {"generation": 2}, "spec": {"replicas": 1},
           "status": {"replicas": 1, "readyReplicas": 0, "updatedReplicas": 1}}  # fmt: skip
    workloads["prefill"] = status.DeploymentState.from_workload(lws)
    assert workloads["prefill"].observed_generation == 2  # LWS has no observedGeneration: not "rolling"
    why = "group m-prefill-lws-0 has 1 of 2 pods scheduled; " + groups.GANG_ADVICE
    out = status.compute_status(
        s, NO_STATUS, workloads, 1, "http://x", NOW, incomplete_groups={"prefill": why}
    )
    ready = {c.type: c for c in out.conditions}["Ready"]
    assert (ready.status, ready.reason) == ("False", "IncompleteGroup")
    assert why in ready.message and ready.message.startswith("prefill 0/1 ready")
    progressing = {c.type: c for c in out.conditions}["Progressing"]
    assert (progressing.status, progressing.reason) == ("True", "IncompleteGroup")
    assert out.prefill is not None and out.prefill.replicas == 1 and out.prefill.ready_replicas == 0

    del workloads["prefill"]
    out = status.compute_status(
        s, NO_STATUS, workloads, 1, "http://x", NOW, leader_worker_set_available=False
    )
    ready = {c.type: c for c in out.conditions}["Ready"]
    assert (ready.status, ready.reason) == ("False", "LeaderWorkerSetMissing")
    assert "install LeaderWorkerSet v0.7" in ready.message and ready.message.startswith("prefill needs")
    assert out.phase != "Ready"
    # With LWS served but not created yet: waiting, naming the kind.
    out = status.compute_status(s, NO_STATUS, workloads, 1, "http://x", NOW)
    assert "prefill LeaderWorkerSet missing" in {c.type: c for c in out.conditions}["Ready"].message


def test_sizes() -> None:
    role = api.PrefillSpec(tensorParallel=32, gpusPerNode=8)
    assert (groups.spans_nodes(role), groups.pods_per_replica(role), groups.gpus_per_pod(role)) == (
        True,
        4,
        8,
    )
    role = api.PrefillSpec(tensorParallel=8, gpusPerNode=8)
    assert (groups.spans_nodes(role), groups.pods_per_replica(role), groups.gpus_per_pod(role)) == (
        False,
        1,
        8,
    )


def ready_pod(role: str, name: str, ready: bool) -> status.PodScheduling:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    body = {"metadata": {"name": name, "labels": {groups.SET_NAME_LABEL: "m-prefill-lws"}},
            "spec": {"nodeName": "n"}, "status": {"conditions": conditions}}  # fmt: skip
    return status.PodScheduling.from_body(body, role)


def test_a_group_is_ready_only_when_all_its_pods_are() -> None:
    s = spec(prefill={**SPANNING, "replicas": 2, "maxReplicas": 4})
    states = {
        "m-prefill-lws-0": True,
        "m-prefill-lws-0-1": True,
        "m-prefill-lws-1": True,
        "m-prefill-lws-1-1": False,
    }
    pods = [ready_pod("prefill", name, ready) for name, ready in states.items()]
    assert status.ready_groups_by_role(s, pods) == {"prefill": 1}
    assert status.ready_groups_by_role(s, pods[:1]) == {"prefill": 0}  # a worker not even created yet
    # LWS v0.7.0 says 2 groups ready (a worker StatefulSet that made its pod counts): the pods say 1.
    workloads = {r: status.DeploymentState(spec_replicas=1, replicas=1, ready_replicas=1, updated_replicas=1)
                 for r in ("decode", "router")}  # fmt: skip
    workloads["prefill"] = status.DeploymentState(
        spec_replicas=2, replicas=2, ready_replicas=2, updated_replicas=2
    )
    out = status.compute_status(s, NO_STATUS, workloads, 1, "http://x", NOW,
                                ready_groups=status.ready_groups_by_role(s, pods))  # fmt: skip
    assert out.prefill is not None and out.prefill.ready_replicas == 1
    assert {c.type: c for c in out.conditions}["Ready"].status == "False"
