"""A prefill backlog that the TTFT SLO lets wait is held in the queue, not drained by new replicas:
only what the pool sized for the load cannot hold within the SLO is sized to drain."""

from __future__ import annotations

import prefill_pool
import pytest
from kvrelay_operator.autoscaler.load import Load, absorbed_backlog
from kvrelay_operator.autoscaler.types import MetricsSample

PREFILL_CAP = prefill_pool.PREFILL_CAP
READY = 6
RATE = 62_000.0  # prompt tokens/s: a little over the 60k the 6 ready replicas serve


def _metrics(ttft_slo: float, prompt: float, queued: float) -> MetricsSample:
    return prefill_pool.metrics(ttft_slo * 0.8, prompt, RATE, queued)


def _load(ttft_slo: float, prompt: float, queued: float) -> Load:
    # The previous decision saw no queue: this one has just formed.
    return prefill_pool.load(
        prefill_pool.config(ttft_slo), _metrics(ttft_slo, prompt, queued), READY, last_queued=0.0
    )


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
    loose = prefill_pool.config(15.0)
    metrics = _metrics(15.0, 12_000.0, 0.0)
    absorbed = absorbed_backlog(RATE, PREFILL_CAP, metrics, loose)
    pool = 7 * PREFILL_CAP  # 62k tokens/s at 95% per replica
    # Seconds of the pool's work: above zero, below the 13.8 s budget (15 s less a 1.2 s prefill).
    assert 3.0 < absorbed / pool < 13.8
    assert absorbed_backlog(RATE, PREFILL_CAP, metrics, prefill_pool.config(20.0)) > absorbed
    assert absorbed_backlog(0.0, PREFILL_CAP, metrics, loose) == 0.0
    # 2k-token prompts (0.2 s each) on a 0.4 s SLO: the load's own p99 wait uses the whole budget.
    tight = prefill_pool.config(0.4)
    assert absorbed_backlog(RATE, PREFILL_CAP, _metrics(0.4, 2_000.0, 0.0), tight) == 0.0
