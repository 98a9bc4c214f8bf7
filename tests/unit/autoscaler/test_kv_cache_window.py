"""Decode's KV-cache need reads the cache over the window: scale-up its mean use (one scrape that
caught a long prompt's cache is no lasting need), scale-down's N-1 check its peak use."""

from __future__ import annotations

from kvrelay_operator.autoscaler.estimators import kv_cache_replicas
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.prometheus import QuerySpec, build_queries
from kvrelay_operator.autoscaler.types import (
    Decision,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    Snapshot,
)

NOW = 10_000.0
DECODE = 2
CONFIG = PolicyConfig(
    ttft_slo_seconds=15.0,
    itl_slo_seconds=0.06,
    prefill=RoleLimits(max_replicas=64),
    decode=RoleLimits(max_replicas=64),
    prefill_tokens_per_second=10_000.0,
    decode_tokens_per_second=2_000.0,
    learn_capacity=False,
)


def _metrics(now: float | None, mean: float | None, peak: float | None) -> MetricsSample:
    """Light token load (decode needs one replica for its tokens/s): only the KV cache can ask for more."""
    return MetricsSample(
        observed_at=NOW,
        window_seconds=60.0,
        ttft_seconds=2.0,
        itl_seconds=0.03,
        request_rate=3.0,
        prompt_tokens_per_second=36_000.0,
        generation_tokens_per_second=900.0,
        queued_prefill_tokens=0.0,
        prefill_requests_waiting=0.0,
        decode_requests_waiting=0.0,
        decode_requests_running=20.0,
        kv_cache_usage_ratio=now,
        kv_cache_usage_mean_ratio=mean,
        kv_cache_usage_peak_ratio=peak,
    )


def _snapshot(metrics: MetricsSample, decode: int = DECODE) -> Snapshot:
    return Snapshot(
        metrics=metrics,
        prefill=RoleReplicas(current=6, ready=6),
        decode=RoleReplicas(current=decode, ready=decode),
    )


def _decide(now: float | None, mean: float | None, peak: float | None) -> Decision:
    metrics = _metrics(now, mean, peak)
    # Quiet for long enough that no cooldown holds either way.
    state = PolicyState(last_metrics_at=NOW - 30.0, last_queued_prefill_tokens=0.0, last_prefill_ready=6)
    decision, _ = decide(_snapshot(metrics), state, CONFIG, NOW)
    return decision


def test_one_scrape_of_a_full_cache_buys_no_decode_replica() -> None:
    # The scrape now caught a 100k-token prompt's cache (86%); over the window the cache ran 40% full.
    decision = _decide(now=0.86, mean=0.40, peak=0.86)
    assert decision.decode.replicas == DECODE, decision.decode.reason
    assert decision.inputs["kv_cache_usage_mean_ratio"] == 0.40
    assert decision.inputs["kv_cache_usage_peak_ratio"] == 0.86


def test_a_cache_full_through_the_window_buys_one() -> None:
    decision = _decide(now=0.90, mean=0.90, peak=0.95)
    assert decision.decode.replicas == DECODE + 1, decision.decode.reason


def test_without_the_window_series_the_use_now_decides_as_before() -> None:
    decision = _decide(now=0.86, mean=None, peak=None)
    assert decision.decode.replicas == DECODE + 1, decision.decode.reason
    assert "kv_cache_usage_mean_ratio" not in decision.inputs


def test_scale_down_must_hold_the_window_peak() -> None:
    # Three replicas whose caches ran 30% full on average but reached 80%: two would not hold the peak.
    snapshot = _snapshot(_metrics(now=0.3, mean=0.3, peak=0.8), decode=3)
    down_target = CONFIG.kv_cache_target * 0.9
    assert kv_cache_replicas(snapshot.metrics, snapshot, CONFIG, down_target, peak=True) == 4  # type: ignore[arg-type]
    assert kv_cache_replicas(snapshot.metrics, snapshot, CONFIG, down_target, peak=False) == 2  # type: ignore[arg-type]


def test_the_window_queries_average_each_workers_mean_and_peak() -> None:
    queries = build_queries(QuerySpec(model="m", window_seconds=60, quantile=0.99))
    series = 'kvrelay_kv_cache_usage_ratio{model="m",role="decode"}[60s]'
    assert queries["kv_cache_usage_mean_ratio"] == f"avg(avg_over_time({series}))"
    assert queries["kv_cache_usage_peak_ratio"] == f"avg(max_over_time({series}))"
