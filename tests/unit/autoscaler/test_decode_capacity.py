"""Decode capacity learned from ITL: the mean pairs with the rate, the quantile's spread is margin."""

from __future__ import annotations

import pytest
from kvrelay_operator.autoscaler.estimators import estimate_demand, learn_capacity
from kvrelay_operator.autoscaler.types import (
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    Snapshot,
)

SLO = 0.03
BASE_FRACTION = 0.6  # a one-sequence step takes 18 ms
C = 5e-5  # seconds of step per token/s of one replica's output: mean ITL = a / (1 - C x)
DECODE_READY = 4


def _config() -> PolicyConfig:
    return PolicyConfig(
        ttft_slo_seconds=1.0,
        itl_slo_seconds=SLO,
        prefill=RoleLimits(max_replicas=40),
        decode=RoleLimits(max_replicas=40),
        prefill_tokens_per_second=10_000.0,
        decode_tokens_per_second=4_000.0,
        decode_base_itl_fraction=BASE_FRACTION,
        learn_capacity=True,
        capacity_ewma_alpha=1.0,  # one observation is what is learned, to read it directly
    )


def _learned(per_replica: float, spread: float, with_mean: bool = True) -> float:
    """Decode capacity learned from one window of a pool whose mean ITL follows the step model and
    whose quantile sits `spread` times above its mean (requests of unequal context)."""
    base = BASE_FRACTION * SLO
    mean = base / (1 - C * per_replica)
    metrics = MetricsSample(
        observed_at=100.0,
        window_seconds=30.0,
        itl_seconds=spread * mean,
        mean_itl_seconds=mean if with_mean else None,
        request_rate=10.0,
        prompt_tokens_per_second=10_000.0,
        generation_tokens_per_second=per_replica * DECODE_READY,
        decode_requests_waiting=0.0,
    )
    snapshot = Snapshot(
        metrics=metrics, prefill=RoleReplicas(current=2, ready=2), decode=RoleReplicas(current=4, ready=4)
    )
    config, state = _config(), PolicyState()
    demand = estimate_demand(metrics, state, config, 100.0)
    return learn_capacity(metrics, snapshot, state, config, demand)["decode"]


def _true_capacity(spread: float) -> float:
    """Tokens/s per replica at which the quantile ITL reaches the SLO: mean = SLO / spread."""
    return (1 - BASE_FRACTION * SLO * spread / SLO) / C


@pytest.mark.parametrize("spread", [1.0, 1.15, 1.3])
@pytest.mark.parametrize("per_replica", [2_500.0, 4_000.0, 5_500.0])
def test_decode_capacity_is_exact_under_a_constant_spread(per_replica: float, spread: float) -> None:
    assert _learned(per_replica, spread) == pytest.approx(_true_capacity(spread), rel=1e-6)


def test_the_quantile_alone_reads_spread_as_load_and_learns_low() -> None:
    """An exporter without the mean falls back to the quantile: safe (low), never above the truth."""
    spread = 1.15
    quantile_only = _learned(4_000.0, spread, with_mean=False)
    assert quantile_only < 0.9 * _true_capacity(spread)
    assert _learned(4_000.0, 1.0, with_mean=False) == pytest.approx(_true_capacity(1.0), rel=1e-6)
