"""Tensor parallelism on the cluster on one machine (issue 15): roles up to a node stay Deployments
with --tensor-parallel; a role spanning nodes becomes a LeaderWorkerSet, which the real LWS
controller (v0.7.0, webhooks over TLS: lws_controller.py) turns into groups of pods that
kube-scheduler places on kwok's fake 8-GPU nodes.

The first test runs with the LWS CRD absent (the operator must still work and say what is missing);
the others install it and start the controller for the rest of the session.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kvrelay_envtest import ControlPlane, get_json, wait_for
from kvrelay_worker.entrypoint import build_parser
from kvrelay_worker.tp.options import TPOptions, resolve
from kwok_nodes import add_kwok_nodes, gpu_node
from lws_controller import CRD_NAME, SET_NAME_LABEL, find_lws, start_lws_controller

pytestmark = pytest.mark.controlplane

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
POOL_LABEL = "kvrelay.dev/node-pool"
# Pools of their own, so that pods other tests leave behind while their namespaces go never hold
# these nodes' GPUs: two free 8-GPU nodes for the whole group, and two of which one is cordoned.
WHOLE_POOL, HALF_POOL = "lws-whole", "lws-half"
LWS_NODES = [gpu_node(f"{pool}-{i}", pool, 8, zone=f"zone-{'ab'[i]}") for pool in (WHOLE_POOL, HALF_POOL)
             for i in range(2)]  # fmt: skip
CORDONED = f"{HALF_POOL}-1"


def model(name: str, prefill: dict[str, Any], decode: dict[str, Any]) -> str:
    spec = {"model": {"source": "org/model"}, "prefill": prefill, "decode": decode,
            "networkPolicy": {"enabled": True}}  # fmt: skip
    return json.dumps({"apiVersion": "kvrelay.dev/v1alpha1", "kind": "DisaggregatedModel",
                       "metadata": {"name": name}, "spec": spec})  # fmt: skip


def placed(pool: str, tp: int, per_node: int = 8) -> dict[str, Any]:
    return {"tensorParallel": tp, "gpusPerNode": per_node, "nodeSelector": {POOL_LABEL: pool},
            "tolerations": [GPU_TOLERATION]}  # fmt: skip


DECODE_TP1 = placed("decode-l40s", 1, per_node=4)


def condition(kubectl, namespace: str, name: str, type_: str) -> dict[str, Any]:
    status = get_json(kubectl, "dm", name, "-n", namespace).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def wait_reason(kubectl, namespace: str, name: str, type_: str, reason: str) -> dict[str, Any]:
    """The model's condition of a type once it has this reason (30 s at most)."""
    return wait_for(lambda: (c := condition(kubectl, namespace, name, type_)).get("reason") == reason and c,
                    timeout=30, what=f"{type_} {reason}")  # fmt: skip


def lws_replicas(kubectl, namespace: str, name: str) -> int:
    return get_json(kubectl, "leaderworkerset", name, "-n", namespace)["spec"]["replicas"]


def served(cp: ControlPlane, group_version: str) -> bool:
    try:
        cp.request("GET", f"/apis/{group_version}")
    except Exception:  # 404 once the CRD is gone
        return False
    return True


@pytest.fixture
def no_lws_crd(cluster: ControlPlane, kubectl) -> None:
    """The cluster without LeaderWorkerSets (as most clusters are)."""
    kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", check=True)
    wait_for(lambda: not served(cluster, "leaderworkerset.x-k8s.io/v1"), timeout=30, what="LWS API gone")


@pytest.fixture(scope="module")
def lws(cluster: ControlPlane, kubectl) -> Iterator[None]:
    """The LWS CRD as its release ships it, its controller with TLS webhooks, and the test's nodes."""
    lws_dir, why = find_lws()
    if lws_dir is None:
        pytest.skip(f"no LeaderWorkerSet build: {why}")
    kubectl("apply", "--server-side", "-f", str(lws_dir / "leaderworkersets.yaml"), check=True)
    wait_for(lambda: served(cluster, "leaderworkerset.x-k8s.io/v1"), timeout=30, what="LWS API served")
    start_lws_controller(cluster, lws_dir)
    add_kwok_nodes(cluster, LWS_NODES)
    kubectl("cordon", CORDONED, check=True)
    yield


def test_without_the_lws_crd_a_spanning_role_says_to_install_it(
    no_lws_crd, kubectl, namespace, operator
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=model("wide", placed(WHOLE_POOL, 16), DECODE_TP1),
            check=True)  # fmt: skip
    ready = wait_reason(kubectl, namespace, "wide", "Ready", "LeaderWorkerSetMissing")
    assert ready["status"] == "False"
    assert "install LeaderWorkerSet v0.7 or newer" in ready["message"] and ready["message"].startswith(
        "prefill"
    )
    # The rest of the model is there: decode as a Deployment, the prefill Service, no prefill workload.
    wait_for(lambda: set(deployments_in(kubectl, namespace)) == {"wide-decode", "wide-router"}, timeout=30,
             what="the decode and router Deployments, and no prefill one")  # fmt: skip
    assert get_json(kubectl, "service", "wide-prefill", "-n", namespace)["spec"]["clusterIP"] == "None"


def deployments_in(kubectl, namespace: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in get_json(kubectl, "deployments", "-n", namespace)["items"]}


def pods_of(kubectl, namespace: str, selector: str) -> list[dict[str, Any]]:
    return get_json(kubectl, "pods", "-n", namespace, "-l", selector)["items"]


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0].get("env") or []}


def tp_secret(kubectl, namespace: str, model_name: str) -> dict[str, Any] | None:
    """The model's TP link Secret (<model>-tp-link-<uid prefix>), or None while there is none."""
    uid = get_json(kubectl, "dm", model_name, "-n", namespace)["metadata"]["uid"]
    found = get_json(kubectl, "secrets", "-n", namespace)["items"]
    return next((x for x in found if x["metadata"]["name"] == f"{model_name}-tp-link-{uid[:8]}"), None)


def digest(secret: dict[str, Any]) -> str:
    """A fingerprint of the Secret's data, so that no assertion message prints the key itself."""
    return hashlib.sha256(json.dumps(secret["data"], sort_keys=True).encode()).hexdigest()


def test_a_tp16_role_is_one_group_of_two_pods_on_two_nodes(
    lws, cluster, kubectl, namespace, operator
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=model("wide", placed(WHOLE_POOL, 16), DECODE_TP1),
            check=True)  # fmt: skip
    lws_obj = wait_for(lambda: get_json(kubectl, "leaderworkerset", "wide-prefill-lws", "-n", namespace),
                       timeout=30, what="the prefill LeaderWorkerSet")  # fmt: skip
    assert lws_obj["spec"]["replicas"] == 1
    assert lws_obj["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert lws_obj["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    deployments = wait_for(lambda: len(found := deployments_in(kubectl, namespace)) == 2 and found,
                           timeout=30, what="the decode and router Deployments")  # fmt: skip
    assert set(deployments) == {"wide-decode", "wide-router"}
    decode_args = deployments["wide-decode"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--tensor-parallel" not in decode_args  # TP1

    selector = f"{SET_NAME_LABEL}=wide-prefill-lws"

    def both_placed() -> list[dict[str, Any]] | None:
        pods = pods_of(kubectl, namespace, selector)
        return pods if len(pods) == 2 and all(p["spec"].get("nodeName") for p in pods) else None

    pods = {
        p["metadata"]["name"]: p for p in wait_for(both_placed, timeout=60, what="the group's 2 pods placed")
    }
    # LWS v0.7.0's naming: leader <lws>-<group>, worker <lws>-<group>-<index>, on two distinct nodes.
    assert set(pods) == {"wide-prefill-lws-0", "wide-prefill-lws-0-1"}
    nodes = {p["spec"]["nodeName"] for p in pods.values()}
    assert nodes == {f"{WHOLE_POOL}-0", f"{WHOLE_POOL}-1"}
    leader, worker = pods["wide-prefill-lws-0"], pods["wide-prefill-lws-0-1"]
    assert leader["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert worker["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"] == "1"
    assert leader["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/group-index"] == "0"
    # What the pod webhook injects, and what the worker's `auto` would otherwise derive.
    for pod, index in ((leader, "0"), (worker, "1")):
        env = env_of(pod)
        assert env["LWS_LEADER_ADDRESS"] == f"wide-prefill-lws-0.wide-prefill-lws.{namespace}"
        assert env["LWS_WORKER_INDEX"] == index and env["LWS_GROUP_SIZE"] == "2"
        assert env["KVRELAY_LWS_NAME"] == "wide-prefill-lws"
        assert (
            pod["spec"]["subdomain"] == "wide-prefill-lws"
            and pod["spec"]["hostname"] == pod["metadata"]["name"]
        )
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # Every rank's link proves the same key: one Secret of the model's, read by leader and worker.
    secret = tp_secret(kubectl, namespace, "wide")
    assert secret is not None, "no TP link Secret"
    uid = get_json(kubectl, "dm", "wide", "-n", namespace)["metadata"]["uid"]
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("DisaggregatedModel", uid, True)
    assert secret["type"] == "Opaque" and secret.get("immutable") is True
    assert len(bytes.fromhex(base64.b64decode(secret["data"]["secret"]).decode())) == 32
    for pod in (leader, worker):
        (tp_env,) = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "KVRELAY_TP_SECRET"]
        assert tp_env == {"name": "KVRELAY_TP_SECRET", "valueFrom": {"secretKeyRef": {
            "name": secret["metadata"]["name"], "key": "secret"}}}, pod["metadata"]["name"]  # fmt: skip
    # Decode runs one pod a replica: its worker makes its own key, no Secret is referenced.
    decode_env = deployments["wide-decode"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not any(e["name"] == "KVRELAY_TP_SECRET" for e in decode_env)
    # The worker resolves its place from these pods as the API server has them: with the webhook's
    # LWS_* env, and from POD_NAME alone (the operator's fallback contract) to the same answer.
    for pod, rank in ((leader, 0), (worker, 1)):
        args = build_parser().parse_args(pod["spec"]["containers"][0]["args"])
        opts = TPOptions(size=args.tensor_parallel, nodes=args.tp_nodes, node_rank=args.tp_node_rank,
                         leader_addr=args.tp_leader_addr, port=args.tp_port)  # fmt: skip
        env = {**env_of(pod), "POD_NAME": pod["metadata"]["name"], "POD_NAMESPACE": namespace}
        fallback = {k: v for k, v in env.items() if not k.startswith("LWS_")}
        for given in (env, fallback):
            placed_at = resolve(opts, given)
            assert (placed_at.node_rank, placed_at.size, placed_at.nodes) == (rank, 16, 2)
            assert placed_at.leader_addr == f"wide-prefill-lws-0.wide-prefill-lws.{namespace}"
            assert placed_at.local_ranks == list(range(8 * rank, 8 * rank + 8))
    # The ranks' DNS comes from the LWS's own Service; the router's Service sees leaders only.
    lws_service = get_json(kubectl, "service", "wide-prefill-lws", "-n", namespace)
    assert lws_service["spec"]["publishNotReadyAddresses"] is True
    ours = get_json(kubectl, "service", "wide-prefill", "-n", namespace)
    assert ours["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"

    def leader_endpoint_only() -> bool:
        slices = get_json(kubectl, "endpointslices", "-n", namespace, "-l",
                          "kubernetes.io/service-name=wide-prefill")["items"]  # fmt: skip
        targets = {e["targetRef"]["name"] for s in slices for e in s.get("endpoints") or []}
        return targets == {"wide-prefill-lws-0"}

    wait_for(leader_endpoint_only, timeout=60, what="the prefill Service's endpoints: the leader only")
    # The group is Ready (kwok plays the kubelets): mirrored as one ready prefill replica, model Ready.
    wait_for(lambda: condition(kubectl, namespace, "wide", "Ready").get("status") == "True", timeout=90,
             what="model Ready")  # fmt: skip
    status = get_json(kubectl, "dm", "wide", "-n", namespace)["status"]
    assert status["prefill"]["replicas"] == 1 and status["prefill"]["readyReplicas"] == 1

    # A hand scale of the LWS is drift, put back like a Deployment's.
    kubectl("patch", "leaderworkerset", "wide-prefill-lws", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"replicas":3}}', check=True)  # fmt: skip
    wait_reason(kubectl, namespace, "wide", "DriftCorrected", "ReplicasRestored")
    assert lws_replicas(kubectl, namespace, "wide-prefill-lws") == 1

    # Replicas (groups) follow the spec, as a Deployment's pods do: 2 groups need 4 nodes, 2 are free.
    kubectl("patch", "dm", "wide", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"prefill":{"replicas":2}}}', check=True)  # fmt: skip
    wait_for(lambda: lws_replicas(kubectl, namespace, "wide-prefill-lws") == 2, timeout=30, what="2 groups")
    # That spec edit was reconciled (the LWS has 2 groups): the key is the one the first group holds.
    again = tp_secret(kubectl, namespace, "wide")
    assert again is not None and again["metadata"]["uid"] == secret["metadata"]["uid"]
    assert digest(again) == digest(secret), "the TP link key changed under a running group"


def test_with_one_node_free_the_group_stays_incomplete_and_status_says_so(
    lws, kubectl, namespace, operator
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=model("half", placed(HALF_POOL, 16), DECODE_TP1),
            check=True)  # fmt: skip

    def one_placed_one_pending() -> bool:
        pods = pods_of(kubectl, namespace, f"{SET_NAME_LABEL}=half-prefill-lws")
        bound = [p for p in pods if p["spec"].get("nodeName")]
        pending = [c for p in pods for c in (p.get("status") or {}).get("conditions") or []
                   if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"]  # fmt: skip
        return len(pods) == 2 and len(bound) == 1 and len(pending) == 1

    wait_for(one_placed_one_pending, timeout=60, what="one pod of the group placed, the other Unschedulable")
    # LWS's own status counts this group ready (its worker StatefulSet made its pod): the model must not.
    ready = wait_reason(kubectl, namespace, "half", "Ready", "IncompleteGroup")
    assert ready["status"] == "False"
    assert "group half-prefill-lws-0 has 1 of 2 pods scheduled" in ready["message"]
    assert "kube-scheduler does not gang-schedule" in ready["message"]
    progressing = condition(kubectl, namespace, "half", "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "IncompleteGroup")
    # Free the node: the group completes and the model becomes Ready.
    kubectl("uncordon", CORDONED, check=True)
    try:
        wait_for(lambda: condition(kubectl, namespace, "half", "Ready").get("status") == "True", timeout=90,
                 what="model Ready once the second node is free")  # fmt: skip
    finally:
        kubectl("cordon", CORDONED)


def test_tp4_prefill_and_tp2_decode_are_deployments_that_schedule(kubectl, namespace, operator) -> None:
    prefill, decode = placed("prefill-h100", 4), placed("decode-l40s", 2, per_node=4)
    kubectl("apply", "-n", namespace, "-f", "-", stdin=model("pair", prefill, decode), check=True)
    for role, tp in (("prefill", "4"), ("decode", "2")):
        d = wait_for(lambda role=role: get_json(kubectl, "deployment", f"pair-{role}", "-n", namespace),
                     timeout=30, what=f"pair-{role}")  # fmt: skip
        (c,) = d["spec"]["template"]["spec"]["containers"]
        args = c["args"]
        assert args[args.index("--tensor-parallel") + 1] == tp
        assert (
            c["resources"]["requests"]["nvidia.com/gpu"] == tp == c["resources"]["limits"]["nvidia.com/gpu"]
        )
    wait_for(lambda: condition(kubectl, namespace, "pair", "Ready").get("status") == "True", timeout=90,
             what="model Ready")  # fmt: skip
    for role, pool in (("prefill", "prefill-h100"), ("decode", "decode-l40s")):
        (pod,) = pods_of(kubectl, namespace, f"app.kubernetes.io/instance=pair,kvrelay.dev/role={role}")
        node = get_json(kubectl, "node", pod["spec"]["nodeName"])
        assert node["metadata"]["labels"][POOL_LABEL] == pool


def test_autoscaler_desired_replicas_scale_the_groups(lws, kubectl, kube, namespace, operator) -> None:
    """The autoscaler's hook (status.<role>.desiredReplicas, clamped to bounds) moves a LeaderWorkerSet's
    groups as it moves a Deployment's pods; no LWS pod-deletion-cost victims are marked."""
    # A pool with no nodes: the groups stay unplaced (nothing incomplete, no GPUs held).
    prefill = {**placed("lws-nowhere", 16), "replicas": 1, "minReplicas": 1, "maxReplicas": 3}
    manifest = json.loads(model("auto", prefill, DECODE_TP1))
    manifest["spec"]["autoscaling"] = {"mode": "auto", "intervalSeconds": 3600}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=True)
    wait_for(lambda: lws_replicas(kubectl, namespace, "auto-prefill-lws") == 1, timeout=30, what="1 group")
    wait_for(lambda: (get_json(kubectl, "dm", "auto", "-n", namespace).get("status") or {}).get("autoscaler"),
             timeout=30, what="the autoscaler's first decision (a hold: no Prometheus here)")  # fmt: skip
    kube.patch_status(namespace, "auto", {"prefill": {"desiredReplicas": 2}})
    wait_for(lambda: lws_replicas(kubectl, namespace, "auto-prefill-lws") == 2, timeout=30, what="2 groups")
    kube.patch_status(namespace, "auto", {"prefill": {"desiredReplicas": 7}})
    wait_for(lambda: lws_replicas(kubectl, namespace, "auto-prefill-lws") == 3, timeout=30,
             what="groups clamped to maxReplicas 3")  # fmt: skip
    kube.patch_status(namespace, "auto", {"prefill": {"desiredReplicas": 1}})
    wait_for(lambda: lws_replicas(kubectl, namespace, "auto-prefill-lws") == 1, timeout=30, what="back to 1")
    pods = pods_of(kubectl, namespace, "app.kubernetes.io/instance=auto,kvrelay.dev/role=prefill")
    assert not any("controller.kubernetes.io/pod-deletion-cost" in (p["metadata"].get("annotations") or {})
                   for p in pods)  # fmt: skip


def test_a_role_crossing_gpus_per_node_changes_kind_and_the_old_one_goes(
    lws, kubectl, namespace, operator
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=model("grow", placed("lws-nowhere", 8), DECODE_TP1),
            check=True)  # fmt: skip
    wait_for(
        lambda: "grow-prefill" in deployments_in(kubectl, namespace), timeout=30, what="TP8: a Deployment"
    )
    assert tp_secret(kubectl, namespace, "grow") is None, "TP8 fits a node: no TP link Secret"
    kubectl("patch", "dm", "grow", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"prefill":{"tensorParallel":16}}}', check=True)  # fmt: skip
    wait_for(
        lambda: lws_replicas(kubectl, namespace, "grow-prefill-lws") == 1, timeout=30, what="TP16: an LWS"
    )
    wait_for(lambda: "grow-prefill" not in deployments_in(kubectl, namespace), timeout=30,
             what="the TP8 Deployment deleted")  # fmt: skip
    assert tp_secret(kubectl, namespace, "grow") is not None, "TP16 spans nodes: a TP link Secret"
    # Deleted on purpose: not re-created as drift, and no event says it was.
    time.sleep(3)
    assert "grow-prefill" not in deployments_in(kubectl, namespace)
    events = get_json(kubectl, "events", "-n", namespace, "--field-selector", "reason=ChildRecreated")[
        "items"
    ]
    assert events == []
    # And back: the LWS goes, the Deployment returns.
    kubectl("patch", "dm", "grow", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"prefill":{"tensorParallel":4}}}', check=True)  # fmt: skip
    wait_for(
        lambda: "grow-prefill" in deployments_in(kubectl, namespace), timeout=30, what="TP4: a Deployment"
    )
    wait_for(lambda: not get_json(kubectl, "leaderworkersets", "-n", namespace)["items"], timeout=30,
             what="the LWS deleted")  # fmt: skip
