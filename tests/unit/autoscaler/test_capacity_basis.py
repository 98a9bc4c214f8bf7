"""A learned per-replica capacity is forgotten when what a replica is changes under it (tensorParallel,
the model, batch limits, a new profile), and kept across everything else (replicas, bounds, SLOs)."""

from __future__ import annotations

from typing import Any

import pytest
from kvrelay_operator import api
from kvrelay_operator.autoscaler import kopf_timer
from kvrelay_operator.autoscaler.policy import rebase_capacity
from kvrelay_operator.autoscaler.types import PolicyConfig, PolicyState, RoleLimits, RoleState


def spec(**changes: Any) -> api.DisaggregatedModelSpec:
    doc: dict[str, Any] = {
        "model": {"source": "meta-llama/Llama-3.1-8B"},
        "prefill": {"tensorParallel": 2, "maxReplicas": 8},
        "decode": {"maxReplicas": 8},
        "autoscaling": {"profile": {"prefillTokensPerSecond": 9000}},
    }
    for path, value in changes.items():
        node = doc
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return api.DisaggregatedModelSpec.model_validate(doc)


@pytest.mark.parametrize(
    "change",
    [{"prefill.tensorParallel": 4}, {"model.source": "meta-llama/Llama-3.1-70B"}, {"model.dtype": "float16"},
     {"prefill.maxTokensPerBatch": 4096}, {"autoscaling.profile.prefillTokensPerSecond": 12000},
     {"image": "example.com/kvrelay:other"}],
)  # fmt: skip
def test_what_a_replica_is_changes_the_basis(change: dict[str, Any]) -> None:
    assert kopf_timer.capacity_basis(spec(**change), "prefill") != kopf_timer.capacity_basis(
        spec(), "prefill"
    )


@pytest.mark.parametrize(
    "change",
    [{"prefill.maxReplicas": 16}, {"prefill.minReplicas": 0}, {"prefill.replicas": 3},
     {"autoscaling.slo.ttftSeconds": 5}, {"decode.tensorParallel": 2}, {"prefill.drainSeconds": 30}],
)  # fmt: skip
def test_what_is_asked_of_a_replica_does_not(change: dict[str, Any]) -> None:
    assert kopf_timer.capacity_basis(spec(**change), "prefill") == kopf_timer.capacity_basis(
        spec(), "prefill"
    )


def config(basis: str) -> PolicyConfig:
    return PolicyConfig(
        ttft_slo_seconds=1.0, itl_slo_seconds=0.05, prefill=RoleLimits(capacity_basis=basis),
        decode=RoleLimits(capacity_basis="d"),
    )  # fmt: skip


def learned(basis: str | None) -> PolicyState:
    return PolicyState(
        prefill=RoleState(capacity_tokens_per_second=5000.0, capacity_basis=basis),
        decode=RoleState(capacity_tokens_per_second=700.0, capacity_basis="d"),
    )


def test_a_changed_basis_forgets_the_learned_capacity_of_that_role_only() -> None:
    state = rebase_capacity(learned("old"), config("new"))
    assert state.prefill.capacity_tokens_per_second is None and state.prefill.capacity_basis == "new"
    assert state.decode.capacity_tokens_per_second == 700.0


def test_the_same_basis_keeps_it_and_a_state_from_before_bases_adopts_the_current_one() -> None:
    same = learned("b")
    assert rebase_capacity(same, config("b")) is same
    upgraded = rebase_capacity(learned(None), config("b"))
    assert upgraded.prefill.capacity_tokens_per_second == 5000.0 and upgraded.prefill.capacity_basis == "b"


def test_the_operator_config_carries_each_roles_basis() -> None:
    cfg = kopf_timer.policy_config(spec())
    assert cfg.prefill.capacity_basis == kopf_timer.capacity_basis(spec(), "prefill")
    assert cfg.decode.capacity_basis == kopf_timer.capacity_basis(spec(), "decode")
    assert cfg.prefill.capacity_basis != cfg.decode.capacity_basis
