"""A TTFT miss adds prefill replicas only where queueing causes it: the TTFT quantile less the prefill
queue wait's quantile still over the SLO is prompts whose own prefill outlasts it (Mooncake's long
prompts), which no added replica shortens."""

from __future__ import annotations

import prefill_pool
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.prometheus import QuerySpec, build_queries
from kvrelay_operator.autoscaler.types import Decision, ReasonCode

PROMPT = 12_000.0
READY = 6
TTFT_SLO = 15.0


def _decide(ttft: float, queue_quantile: float | None) -> Decision:
    """Six prefill replicas at 60% load, 100k tokens queued (1.7 s of work, above a tenth of the SLO)."""
    rate = 0.6 * READY * prefill_pool.PREFILL_CAP
    window = prefill_pool.metrics(ttft, PROMPT, rate, 100_000.0, prefill_queue_seconds=queue_quantile)
    # Quiet for long enough that no cooldown holds either way.
    state = prefill_pool.state(100_000.0, READY)
    decision, _ = decide(
        prefill_pool.snapshot(window, READY), state, prefill_pool.config(TTFT_SLO), prefill_pool.NOW
    )
    return decision


def test_a_miss_the_queue_does_not_explain_adds_no_replica() -> None:
    # p99 TTFT 22 s, p99 queue wait 2 s: 20 s of it is prefill itself.
    decision = _decide(ttft=22.0, queue_quantile=2.0)
    assert decision.prefill.code != ReasonCode.SLO_VIOLATION, decision.prefill.reason
    assert decision.prefill.replicas <= READY
    assert decision.inputs["prefill_queue_seconds"] == 2.0


def test_a_miss_the_queue_explains_adds_a_replica() -> None:
    # The same TTFT with 9 s of it spent queued: replicas shorten it.
    decision = _decide(ttft=22.0, queue_quantile=9.0)
    assert decision.prefill.code == ReasonCode.SLO_VIOLATION, decision.prefill.reason
    assert decision.prefill.replicas == READY + 1


def test_without_the_queue_series_a_miss_over_a_queue_counts_as_before() -> None:
    decision = _decide(ttft=22.0, queue_quantile=None)
    assert decision.prefill.code == ReasonCode.SLO_VIOLATION, decision.prefill.reason
    assert "prefill_queue_seconds" not in decision.inputs


def test_the_queue_quantile_is_the_prefill_workers_histogram() -> None:
    query = build_queries(QuerySpec(model="m", window_seconds=60, quantile=0.99))["prefill_queue_seconds"]
    assert query == (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(kvrelay_request_queue_seconds_bucket{model="m",role="prefill"}[60s])))'
    )
