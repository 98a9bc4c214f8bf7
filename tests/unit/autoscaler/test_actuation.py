"""The autoscaler's glue: spec -> policy config, status -> replicas, decision -> status patch,
PromQL building and parsing, and the decision log's replay. Pure functions, no cluster."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from kvrelay_operator import api
from kvrelay_operator.autoscaler import kopf_timer
from kvrelay_operator.autoscaler.decision_log import DecisionLog, read_log, replay
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.prometheus import (
    FIELD_LABEL,
    QuerySpec,
    batch_query,
    build_queries,
    parse_batch,
    parse_scalar,
    to_sample,
)
from kvrelay_operator.autoscaler.types import (
    Decision,
    MetricsSample,
    PolicyState,
    RoleReplicas,
    Snapshot,
)


def make_spec(**autoscaling: object) -> api.DisaggregatedModelSpec:
    return api.DisaggregatedModelSpec.model_validate(
        {
            "model": {"source": "meta-llama/Llama-3.1-8B", "servedName": "llama"},
            "prefill": {"minReplicas": 1, "maxReplicas": 6, "tensorParallel": 1},
            "decode": {"replicas": 3, "minReplicas": 2, "maxReplicas": 9, "tensorParallel": 2},
            "autoscaling": {
                "mode": "auto",
                "slo": {"ttftSeconds": 0.8, "itlSeconds": 0.04, "quantile": 0.95},
                "ratio": {"min": 0.25, "max": 2.0},
                "gpuBudget": 20,
                "intervalSeconds": 10,
                "profile": {"prefillTokensPerSecond": 7000},
                **autoscaling,
            },
        }
    )


def test_policy_config_maps_every_spec_field() -> None:
    config = kopf_timer.policy_config(make_spec())
    assert (config.ttft_slo_seconds, config.itl_slo_seconds, config.quantile) == (0.8, 0.04, 0.95)
    assert (config.prefill.min_replicas, config.prefill.max_replicas, config.prefill.gpus_per_replica) == (
        1,
        6,
        1,
    )
    assert (config.decode.min_replicas, config.decode.max_replicas, config.decode.gpus_per_replica) == (
        2,
        9,
        2,
    )
    assert (config.ratio_min, config.ratio_max, config.gpu_budget) == (0.25, 2.0, 20)
    assert config.interval_seconds == 10 and config.scale_down_window_seconds == 60
    assert config.scale_up_cooldown_seconds == 30 and config.scale_down_cooldown_seconds == 300
    # Profile seeds what is given; the other role keeps the policy's default.
    assert config.prefill_tokens_per_second == 7000
    assert config.decode_tokens_per_second == 2000


def test_query_window_covers_an_interval_and_four_scrapes() -> None:
    spec = make_spec()
    assert kopf_timer.query_spec(spec, "dm").window_seconds == 60  # 4 x the default 15 s scrape
    spec = spec.model_copy(update={"monitoring": api.MonitoringSpec(interval="1s")})
    qspec = kopf_timer.query_spec(spec, "dm")
    assert qspec.window_seconds == 10 and qspec.model == "llama" and qspec.quantile == 0.95


def test_role_replicas_follow_the_reconcilers_target() -> None:
    spec = make_spec()
    status = api.DisaggregatedModelStatus.model_validate(
        {"prefill": {"replicas": 3, "readyReplicas": 2, "desiredReplicas": 4}, "decode": {"readyReplicas": 5}}
    )
    assert kopf_timer.role_replicas(spec, status, "prefill") == RoleReplicas(current=4, ready=2)
    # No desiredReplicas yet: spec.replicas is what runs; ready cannot exceed it.
    decode = kopf_timer.role_replicas(spec, status, "decode")
    assert decode.current == spec.decode.replicas and decode.ready == min(5, decode.current)


def _snapshot(metrics: MetricsSample | None) -> Snapshot:
    two = RoleReplicas(current=2, ready=2)
    return Snapshot(metrics=metrics, prefill=two, decode=two)


def _sample(now: float, scale: float) -> MetricsSample:
    return MetricsSample(
        observed_at=now,
        prompt_tokens_per_second=10_000.0 * scale,
        generation_tokens_per_second=1_600.0 * scale,
        request_rate=10.0 * scale,
    )


def _decision(hold: bool = False) -> Decision:
    snapshot = _snapshot(None if hold else _sample(100.0, 5.0))
    decision, _ = decide(snapshot, PolicyState(), kopf_timer.policy_config(make_spec()), 100.0)
    return decision


def test_status_patch_auto_writes_desired_replicas_advisory_does_not() -> None:
    decision = _decision()
    auto = kopf_timer.decision_status_patch(decision, "auto", "2026-01-01T00:00:00Z")
    assert auto["prefill"] == {"desiredReplicas": decision.prefill.replicas}
    assert auto["decode"] == {"desiredReplicas": decision.decode.replicas}
    assert auto["autoscaler"]["lastDecisionTime"] == "2026-01-01T00:00:00Z"
    assert auto["autoscaler"]["reason"] == decision.reason
    assert auto["autoscaler"]["inputs"]["prefill_demand_tokens_per_second"] == pytest.approx(50_000)
    # The patch must fit the CRD's status schema.
    api.AutoscalerStatus.model_validate(auto["autoscaler"])
    advisory = kopf_timer.decision_status_patch(decision, "advisory", "2026-01-01T00:00:00Z")
    assert set(advisory) == {"autoscaler"}
    assert advisory["autoscaler"]["prefillReplicas"] == decision.prefill.replicas


def test_hold_never_writes_desired_replicas() -> None:
    decision = _decision(hold=True)
    patch = kopf_timer.decision_status_patch(decision, "auto", "t", note="Prometheus query failed: boom")
    assert set(patch) == {"autoscaler"}
    assert patch["autoscaler"]["reason"] == "hold: no metrics (Prometheus query failed: boom)"


def test_event_message_says_what_moved_and_why() -> None:
    decision = _decision()
    message = kopf_timer.event_message(decision, "advisory")
    assert message.startswith(f"advised prefill 2->{decision.prefill.replicas}, decode 2->")
    assert decision.prefill.reason in message


def test_queries_use_only_contract_names_and_the_model_label() -> None:
    queries = build_queries(QuerySpec(model='we"ird', window_seconds=45, quantile=0.9))
    assert set(queries) - {"observed_at"} <= set(MetricsSample.model_fields)
    for name, query in queries.items():
        assert 'model="we\\"ird"' in query, name
        assert "kvrelay_" in query, name
    assert queries["ttft_seconds"].startswith("histogram_quantile(0.9, sum by (le) (rate(")
    assert "kvrelay_time_to_first_token_seconds_bucket" in queries["ttft_seconds"]
    assert "[45s]" in queries["generation_tokens_per_second"]
    assert 'role="prefill"' in queries["queued_prefill_tokens"]


@pytest.mark.parametrize(
    ("result", "value"),
    [
        ([{"metric": {}, "value": [1700000000.0, "12.5"]}], 12.5),
        ([], None),
        ([{"metric": {}, "value": [1700000000.0, "NaN"]}], None),
        ([{"metric": {}, "value": [1700000000.0, "+Inf"]}], None),
        ({"unexpected": True}, None),
    ],
)
def test_parse_scalar(result: object, value: float | None) -> None:
    assert parse_scalar(result) == value


def test_one_batched_query_answers_every_field() -> None:
    queries = build_queries(QuerySpec(model="m"))
    batched = batch_query(queries)
    assert batched.count(" or label_replace(") == len(queries) - 1
    assert all(f'"{FIELD_LABEL}", "{name}"' in batched for name in queries)
    answer = [
        {"metric": {FIELD_LABEL: "ttft_seconds"}, "value": [1.0, "0.25"]},
        {"metric": {FIELD_LABEL: "itl_seconds"}, "value": [1.0, "NaN"]},
        {"metric": {FIELD_LABEL: "not_a_field"}, "value": [1.0, "3"]},
        {"metric": {}, "value": [1.0, "4"]},
    ]
    values = parse_batch(answer, queries)
    assert set(values) == set(queries)
    assert values["ttft_seconds"] == 0.25 and values["itl_seconds"] is None and values["request_rate"] is None
    assert parse_batch({"unexpected": True}, queries) == dict.fromkeys(queries)


def test_to_sample_is_none_without_any_worker_series_and_clamps_negatives() -> None:
    assert to_sample({"observed_at": None, "prompt_tokens_per_second": 3.0}, 60) is None
    sample = to_sample({"observed_at": 1700.0, "prompt_tokens_per_second": -0.0001, "ttft_seconds": None}, 60)
    assert sample is not None and sample.prompt_tokens_per_second == 0.0 and sample.ttft_seconds is None
    assert sample.observed_at == 1700.0 and not math.isnan(sample.window_seconds)


def test_decision_log_round_trips_and_replays_identically(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, keep=3)
    config = kopf_timer.policy_config(make_spec())
    state = PolicyState()
    for step in range(1, 6):
        now = 10.0 * step
        snapshot = _snapshot(_sample(now, float(step)))
        decision, state = decide(snapshot, state, config, now)
        log.record("ns/dm", snapshot, decision)
    assert len(log.entries) == 3  # bounded in memory
    entries = read_log(path)
    assert len(entries) == 5  # complete on disk
    assert replay(entries, config) == [e.decision for e in entries]
