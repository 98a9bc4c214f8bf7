"""A queued prefill pool reads as a step (ready capacity plus the queue's growth) only where the
queue breaks the TTFT SLO, not wherever a few long prompts wait."""

from __future__ import annotations

import prefill_pool
import pytest
from kvrelay_operator.autoscaler.load import Load

PROMPT = 12_000.0  # long prompts: one queued is far above the 4,096 tokens that mean "never idled"
PREFILL_CAP = prefill_pool.PREFILL_CAP
READY = 7


def _load(ttft_slo: float, queued: float, last_queued: float, prompt_rate: float = 40_000.0) -> Load:
    window = prefill_pool.metrics(ttft_slo * 0.8, PROMPT, prompt_rate, queued)
    return prefill_pool.load(prefill_pool.config(ttft_slo), window, READY, last_queued)


def test_long_prompts_queued_under_a_loose_ttft_slo_are_no_step() -> None:
    # 8 prompts waiting at both ends of the window (saturated by the token rule), 57% load: on a
    # 15 s SLO the queue drains in under 2 s of the 13+ s a request may wait.
    load = _load(ttft_slo=15.0, queued=96_000.0, last_queued=84_000.0)
    assert not load.saturated_p
    assert load.demand.steady_p == pytest.approx(40_000.0)


def test_the_same_queue_under_a_tight_ttft_slo_is_a_step() -> None:
    load = _load(ttft_slo=1.5, queued=96_000.0, last_queued=84_000.0)
    assert load.saturated_p
    # Ready capacity plus the queue's growth: 7 x 10k + 12k / 30 s.
    assert load.demand.steady_p == pytest.approx(READY * PREFILL_CAP + 12_000.0 / 30.0)


def test_a_queue_growing_past_the_slo_before_replicas_serve_is_a_step() -> None:
    # The same 15 s SLO, but the queue grows by 1,500 tokens/s: ~190k more over a start, ~4 s of work.
    small = _load(ttft_slo=15.0, queued=96_000.0, last_queued=51_000.0)
    assert not small.saturated_p
    growing = _load(ttft_slo=15.0, queued=600_000.0, last_queued=150_000.0)
    assert growing.saturated_p


def test_an_overloaded_pool_is_a_step_whatever_the_queue() -> None:
    # Offered load above what the ready pool serves: the queueing model's wait is unbounded.
    load = _load(ttft_slo=15.0, queued=24_000.0, last_queued=12_000.0, prompt_rate=80_000.0)
    assert load.saturated_p
