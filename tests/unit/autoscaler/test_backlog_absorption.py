"""A prefill backlog that the TTFT SLO lets wait is held in the queue, not drained by new replicas:
only what the pool sized for the load cannot hold within the SLO is sized to drain."""

from __future__ import annotations

import pytest
from kvrelay_operator.autoscaler.load import Load, absorbed_backlog, estimate_load
from kvrelay_operator.autoscaler.types import (
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    Snapshot,
)

NOW = 10_000.0
PREFILL_CAP = 10_000.0
READY = 6
RATE = 62_000.0  # prompt tokens/s: a little over the 60k the 6 ready replicas serve


def _config(ttft_slo: float) -> PolicyConfig:
    return PolicyConfig(
        ttft_slo_seconds=ttft_slo,
        itl_slo_seconds=0.06,
        prefill=RoleLimits(max_replicas=64),
        decode=RoleLimits(max_replicas=64),
        prefill_tokens_per_second=PREFILL_CAP,
        decode_tokens_per_second=2_000.0,
        learn_capacity=False,
    )


def _metrics(ttft_slo: float, prompt: float, queued: float, rate: float = RATE) -> MetricsSample:
    return MetricsSample(
        observed_at=NOW,
        window_seconds=60.0,
        ttft_seconds=ttft_slo * 0.8,
        itl_seconds=0.03,
        request_rate=rate / prompt,
        prompt_tokens_per_second=rate,
        generation_tokens_per_second=1_000.0,
        queued_prefill_tokens=queued,
        prefill_requests_waiting=queued / prompt,
        decode_requests_waiting=0.0,
    )


def _load(ttft_slo: float, prompt: float, queued: float) -> Load:
    metrics = _metrics(ttft_slo, prompt, queued)
    snapshot = Snapshot(
        metrics=metrics,
        prefill=RoleReplicas(current=READY, ready=READY),
        decode=RoleReplicas(current=2, ready=2),
    )
    # The previous decision saw no queue: this one has just formed.
    state = PolicyState(last_metrics_at=NOW - 30.0, last_queued_prefill_tokens=0.0, last_prefill_ready=READY)
    roles = {"prefill": state.prefill, "decode": state.decode}
    return estimate_load(snapshot, metrics, state, roles, _config(ttft_slo), NOW)


def test_a_backlog_a_loose_ttft_slo_lets_wait_buys_no_replica() -> None:
    # 300k tokens queued (5 s of the ready pool's work) and growing by 2k/s until replicas asked for
    # now serve: ~420k tokens then. Drained in 30 s that was 14k tokens/s more, a replica more; a 15 s
    # SLO (12k-token prompts, 1.2 s of prefill each) lets it wait behind a pool sized for the load.
    load = _load(ttft_slo=15.0, prompt=12_000.0, queued=300_000.0)
    assert load.forecast["prefill"] > READY * PREFILL_CAP  # the backlog grows until new replicas serve
    assert load.sized["prefill"] == pytest.approx(load.forecast["prefill"])
    assert load.absorbed_p > 300_000.0  # the whole projected backlog waits


def test_the_same_backlog_under_a_tight_ttft_slo_still_drains() -> None:
    load = _load(ttft_slo=1.5, prompt=2_000.0, queued=300_000.0)
    # At most a second of a 7-8 replica pool's work waits within 1.5 s; the rest drains in 30 s.
    assert load.sized["prefill"] >= load.forecast["prefill"] + (300_000.0 - 80_000.0) / 30.0


def test_absorbed_backlog_is_the_ttft_budget_left_over_the_loads_own_wait() -> None:
    loose = _config(15.0)
    metrics = _metrics(15.0, 12_000.0, 0.0)
    absorbed = absorbed_backlog(RATE, PREFILL_CAP, metrics, loose)
    pool = 7 * PREFILL_CAP  # 62k tokens/s at 95% per replica
    # Seconds of the pool's work: above zero, below the 13.8 s budget (15 s less a 1.2 s prefill).
    assert 3.0 < absorbed / pool < 13.8
    assert absorbed_backlog(RATE, PREFILL_CAP, metrics, _config(20.0)) > absorbed
    assert absorbed_backlog(0.0, PREFILL_CAP, metrics, loose) == 0.0
    # 2k-token prompts (0.2 s each) on a 0.4 s SLO: the load's own p99 wait uses the whole budget.
    tight = _config(0.4)
    assert absorbed_backlog(RATE, PREFILL_CAP, _metrics(0.4, 2_000.0, 0.0), tight) == 0.0
