"""status.py: Deployment states -> the parent's status, conditions and merge patch (pure)."""

from __future__ import annotations

from typing import Any

from kvrelay_operator import api
from kvrelay_operator.status import (
    DeploymentState,
    PodScheduling,
    compute_status,
    set_condition,
    status_merge_patch,
    unschedulable_by_role,
)

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
ENDPOINT = "http://m-router.ns.svc:8000/v1"


def spec(**over: Any) -> api.DisaggregatedModelSpec:
    return api.DisaggregatedModelSpec.model_validate({"model": {"source": "org/m"}, **over})


def ready(replicas: int, ready_replicas: int | None = None, **over: Any) -> DeploymentState:
    r = replicas if ready_replicas is None else ready_replicas
    return DeploymentState(
        spec_replicas=replicas,
        replicas=replicas,
        ready_replicas=r,
        updated_replicas=replicas,
        generation=1,
        observed_generation=1,
        **over,
    )


def conditions(status: api.DisaggregatedModelStatus) -> dict[str, api.Condition]:
    return {c.type: c for c in status.conditions}


def test_all_ready_is_ready() -> None:
    s = spec(decode={"replicas": 2})
    out = compute_status(
        s,
        api.DisaggregatedModelStatus(),
        {"prefill": ready(1), "decode": ready(2), "router": ready(1)},
        3,
        ENDPOINT,
        NOW,
        observed_generation=3,
    )
    assert out.phase == "Ready" and out.observed_generation == 3 and out.router_endpoint == ENDPOINT
    c = conditions(out)
    assert (c["Ready"].status, c["Progressing"].status, c["Degraded"].status) == ("True", "False", "False")
    assert c["Ready"].observed_generation == 3
    assert out.decode == api.RoleStatus(replicas=2, ready_replicas=2, desired_replicas=2)


def test_a_role_scaled_to_zero_keeps_the_model_ready_and_says_what_clients_see() -> None:
    auto = {"mode": "auto", "prometheusUrl": "http://p:9090"}
    s = spec(autoscaling=auto, decode={"replicas": 1, "minReplicas": 0})
    asleep = api.DisaggregatedModelStatus(decode=api.RoleStatus(desired_replicas=0))
    deployments = {"prefill": ready(1), "decode": ready(0), "router": ready(1)}
    out = compute_status(s, asleep, deployments, 2, ENDPOINT, NOW)
    c = conditions(out)
    assert out.phase == "Ready" and out.decode is not None and out.decode.desired_replicas == 0
    assert (c["Ready"].status, c["Ready"].reason) == ("True", "ScaledToZero")
    assert (c["Degraded"].status, c["Progressing"].status) == ("False", "False")
    assert c["Ready"].message == (
        "all roles ready; decode scaled to zero: requests wait at the router (up to 60 s) until a replica "
        "is ready; the autoscaler scales up on held requests"
    )
    # Waking up: the replica asked for is not ready yet; nothing is Degraded meanwhile.
    waking = api.DisaggregatedModelStatus(decode=api.RoleStatus(desired_replicas=1))
    out = compute_status(s, waking, {**deployments, "decode": ready(1, 0)}, 2, ENDPOINT, NOW)
    c = conditions(out)
    assert (c["Ready"].reason, c["Degraded"].status) == ("WaitingForReplicas", "False")
    assert "decode 0/1 ready" in c["Ready"].message
    # Both roles at zero by hand, holding off: the message says so.
    off = spec(prefill={"replicas": 0, "minReplicas": 0}, decode={"replicas": 0, "minReplicas": 0},
               router={"maxWaitSeconds": 0})  # fmt: skip
    both = {"prefill": ready(0), "decode": ready(0), "router": ready(1)}
    c = conditions(compute_status(off, api.DisaggregatedModelStatus(), both, 1, ENDPOINT, NOW))
    assert c["Ready"].message == (
        "all roles ready; prefill and decode scaled to zero: requests get a 503 at once "
        "(router.maxWaitSeconds is 0)"
    )


def test_missing_and_unready_roles_are_named() -> None:
    out = compute_status(
        spec(decode={"replicas": 4}),
        api.DisaggregatedModelStatus(),
        {"prefill": ready(1), "decode": ready(4, 1)},
        1,
        ENDPOINT,
        NOW,
    )
    c = conditions(out)
    assert out.phase == "Progressing"
    assert c["Ready"].reason == "WaitingForReplicas"
    assert "decode 1/4 ready" in c["Ready"].message and "router Deployment missing" in c["Ready"].message
    assert compute_status(spec(), api.DisaggregatedModelStatus(), {}, 1, ENDPOINT, NOW).phase == "Pending"


def test_deployment_failure_is_degraded() -> None:
    failing = ready(
        1,
        0,
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out",
            }
        ],
    )
    out = compute_status(
        spec(),
        api.DisaggregatedModelStatus(),
        {"prefill": failing, "decode": ready(1), "router": ready(1)},
        1,
        ENDPOINT,
        NOW,
    )
    assert out.phase == "Degraded"
    assert conditions(out)["Degraded"].message == "prefill: ReplicaSet has timed out"


def test_transition_time_moves_only_on_flip() -> None:
    first = set_condition([], "Ready", "False", "Waiting", "", NOW, 1)
    same = set_condition(first, "Ready", "False", "Waiting", "still", LATER, 1)
    flipped = set_condition(same, "Ready", "True", "AllReplicasReady", "", LATER, 1)
    assert same[0].last_transition_time == NOW and same[0].message == "still"
    assert flipped[0].last_transition_time == LATER


def test_auto_mode_keeps_the_autoscalers_desired_replicas() -> None:
    s = spec(decode={"replicas": 1, "maxReplicas": 4}, autoscaling={"mode": "auto"})
    unset = compute_status(s, api.DisaggregatedModelStatus(), {"decode": ready(1)}, 1, ENDPOINT, NOW, 1)
    assert unset.decode is not None and unset.decode.desired_replicas is None  # never seeded by the operator
    wanted = api.DisaggregatedModelStatus(decode=api.RoleStatus(desired_replicas=9))
    out = compute_status(s, wanted, {"decode": ready(4)}, 1, ENDPOINT, NOW)
    assert out.decode is not None and out.decode.desired_replicas == 9
    limited = conditions(out)["ScalingLimited"]
    assert limited.status == "True" and "decode wants 9, clamped to 4" in limited.message
    off = compute_status(spec(), wanted, {"decode": ready(1)}, 1, ENDPOINT, NOW)
    assert (
        off.decode is not None
        and off.decode.desired_replicas == 1
        and "ScalingLimited" not in conditions(off)
    )


def test_patch_holds_only_changes() -> None:
    old = api.DisaggregatedModelStatus(
        observed_generation=1,
        decode=api.RoleStatus(replicas=1, ready_replicas=0, desired_replicas=5),
        autoscaler=api.AutoscalerStatus(reason="x"),
    )
    new = old.model_copy(deep=True)
    assert status_merge_patch(old, new) == {}
    new.decode = api.RoleStatus(replicas=1, ready_replicas=1, desired_replicas=5)
    new.observed_generation = 2
    # desiredReplicas unchanged -> not re-sent, so a newer autoscaler write cannot be clobbered.
    assert status_merge_patch(old, new) == {"observedGeneration": 2, "decode": {"readyReplicas": 1}}


def test_state_from_deployment_body() -> None:
    body = {
        "metadata": {"generation": 4},
        "spec": {"replicas": 3},
        "status": {"observedGeneration": 3, "replicas": 3, "readyReplicas": 2, "updatedReplicas": 1},
    }
    state = DeploymentState.from_body(body)
    assert (state.spec_replicas, state.ready_replicas, state.generation, state.observed_generation) == (
        3,
        2,
        4,
        3,
    )
    assert DeploymentState.from_body({}).spec_replicas == 0


def pod(role: str, name: str, message: str | None) -> dict[str, Any]:
    conditions = [] if message is None else [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    ]  # fmt: skip
    return {"metadata": {"name": name}, "status": {"conditions": conditions}}


def test_the_schedulers_reason_names_the_stuck_role() -> None:
    why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods = [
        PodScheduling.from_body(pod("decode", "m-decode-b", why), "decode"),
        PodScheduling.from_body(pod("decode", "m-decode-a", why), "decode"),
        PodScheduling.from_body(pod("prefill", "m-prefill-a", None), "prefill"),
    ]
    stuck = unschedulable_by_role(pods)
    assert stuck == {"decode": f"2 pods unschedulable: {why}"}
    out = compute_status(
        spec(decode={"replicas": 2}), api.DisaggregatedModelStatus(),
        {"prefill": ready(1), "decode": ready(2, 0), "router": ready(1)}, 1, ENDPOINT, NOW,
        unschedulable=stuck,
    )  # fmt: skip
    c = conditions(out)
    assert (c["PodsScheduled"].status, c["PodsScheduled"].reason) == ("False", "Unschedulable")
    assert c["PodsScheduled"].message == f"decode: 2 pods unschedulable: {why}"
    assert c["Ready"].message == f"decode 0/2 ready (2 pods unschedulable: {why})"
    assert out.phase == "Progressing"
    placed = compute_status(spec(), out, {"prefill": ready(1), "decode": ready(1), "router": ready(1)}, 1,
                            ENDPOINT, LATER, unschedulable={})  # fmt: skip
    assert conditions(placed)["PodsScheduled"].status == "True"
    assert conditions(placed)["PodsScheduled"].last_transition_time == LATER


def test_a_pod_still_being_scheduled_is_not_unschedulable() -> None:
    gated = {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated", "message": "gated"}
    waiting = {"metadata": {"name": "p"}, "status": {"conditions": [gated]}}
    assert PodScheduling.from_body(waiting, "decode").unschedulable is None
    assert PodScheduling.from_body({"metadata": {"name": "p"}}, "decode").unschedulable is None


def test_stuck_containers_make_the_model_degraded_with_the_kubelets_words() -> None:
    from kvrelay_operator.status import PodScheduling, container_errors_by_role

    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "api-key" not found'}}
    pod = {
        "metadata": {"name": "m-router-abc"},
        "status": {"containerStatuses": [{"name": "router", "state": waiting}]},
    }
    running = {"metadata": {"name": "m-router-def"}, "status": {"containerStatuses": [
        {"name": "router", "state": {"running": {}}},
        {"name": "side", "state": {"waiting": {"reason": "ContainerCreating"}}},  # progress, not stuck
    ]}}  # fmt: skip
    pods = [PodScheduling.from_body(pod, "router"), PodScheduling.from_body(running, "router")]
    errors = container_errors_by_role(pods)
    why = 'container router: CreateContainerConfigError: secret "api-key" not found'
    assert errors == {"router": f"1 pod failing: m-router-abc: {why}"}
    init = {"metadata": {"name": "m-decode-x"}, "status": {"initContainerStatuses": [
        {"name": "download-model", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}}  # fmt: skip
    assert (
        PodScheduling.from_body(init, "decode").container_error
        == "container download-model: ImagePullBackOff"
    )
