"""Decode is sized for the prefill backlog that new prefill replicas will flush into it."""

from __future__ import annotations

import math

import pytest
from kvrelay_operator.autoscaler.load import Load, estimate_load
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.types import (
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    RoleState,
    Snapshot,
)

NOW = 10_000.0
PROMPT = 1_000.0  # tokens per request
OUTPUT = 200.0  # generated tokens per request
PREFILL_CAP = 10_000.0
DECODE_CAP = 2_000.0


def _config() -> PolicyConfig:
    return PolicyConfig(
        ttft_slo_seconds=1.0,
        itl_slo_seconds=0.05,
        prefill=RoleLimits(max_replicas=64),
        decode=RoleLimits(max_replicas=64),
        prefill_tokens_per_second=PREFILL_CAP,
        decode_tokens_per_second=DECODE_CAP,
        learn_capacity=False,
    )


def _snapshot(prompt_rate: float, queued: float, prefill_ready: int) -> Snapshot:
    requests = prompt_rate / PROMPT
    metrics = MetricsSample(
        observed_at=NOW,
        window_seconds=30.0,
        ttft_seconds=0.3,
        itl_seconds=0.03,
        request_rate=requests,
        prompt_tokens_per_second=prompt_rate,
        generation_tokens_per_second=requests * OUTPUT,
        queued_prefill_tokens=queued,
        prefill_requests_waiting=queued / PROMPT,
        decode_requests_waiting=0.0,
    )
    return Snapshot(
        metrics=metrics,
        prefill=RoleReplicas(current=prefill_ready, ready=prefill_ready),
        decode=RoleReplicas(current=4, ready=4),
    )


def _state(queued: float) -> PolicyState:
    return PolicyState(
        mean_output_tokens=OUTPUT,
        last_metrics_at=NOW - 30.0,
        last_queued_prefill_tokens=queued,
        metrics_since=0.0,
    )


def _load(snapshot: Snapshot, state: PolicyState, config: PolicyConfig) -> Load:
    assert snapshot.metrics is not None
    roles = {"prefill": state.prefill, "decode": state.decode}
    return estimate_load(snapshot, snapshot.metrics, state, roles, config, NOW)


def test_a_step_sizes_decode_for_the_backlog_it_will_receive() -> None:
    # Demand tripled over 4 ready prefill replicas: the queue grows until new replicas serve.
    config = _config()
    snapshot = _snapshot(prompt_rate=120_000.0, queued=300_000.0, prefill_ready=4)
    state = _state(queued=100_000.0)
    load = _load(snapshot, state, config)
    # At least today's queue, and more: it grows by demand - ready capacity over a start.
    floor = 300_000.0 / PROMPT * OUTPUT / config.backlog_drain_seconds
    assert load.flush_d > floor
    assert load.sized["decode"] == pytest.approx(load.forecast["decode"] + load.flush_d)
    decision, _ = decide(snapshot, state, config, NOW)
    assert decision.inputs["decode_flush_tokens_per_second"] == pytest.approx(load.flush_d)
    for_load_alone = math.ceil(load.forecast["decode"] / (DECODE_CAP * config.decode_target_utilization))
    assert decision.decode.replicas > for_load_alone


def test_a_backlog_the_ready_pool_clears_first_adds_no_decode() -> None:
    # A burst's queue over a pool with room to spare: drained long before a replica could start.
    config = _config()
    snapshot = _snapshot(prompt_rate=20_000.0, queued=50_000.0, prefill_ready=8)
    state = _state(queued=0.0)
    load = _load(snapshot, state, config)
    assert load.flush_d == 0.0
    assert load.sized["decode"] == pytest.approx(load.forecast["decode"])


def test_no_flush_before_the_output_length_is_known() -> None:
    config = _config()
    snapshot = _snapshot(prompt_rate=120_000.0, queued=300_000.0, prefill_ready=4)
    state = _state(queued=100_000.0).model_copy(update={"mean_output_tokens": None})
    snapshot = snapshot.model_copy(
        update={"metrics": snapshot.metrics.model_copy(update={"generation_tokens_per_second": 0.0})}  # type: ignore[union-attr]
    )
    load = _load(snapshot, state, config)
    assert load.flush_d == 0.0


def test_the_flush_comes_no_faster_than_the_largest_prefill_pool_drains_it() -> None:
    # At most 6 prefill replicas: 60k tokens/s, 48k of them for the load, 12k left for the backlog.
    config = _config().model_copy(update={"prefill": RoleLimits(max_replicas=6)})
    snapshot = _snapshot(prompt_rate=48_000.0, queued=3_000_000.0, prefill_ready=4)
    state = _state(queued=2_800_000.0)
    load = _load(snapshot, state, config)
    assert load.flush_d == pytest.approx((6 * PREFILL_CAP - load.forecast["prefill"]) / PROMPT * OUTPUT)
    assert load.flush_d < 3_000_000.0 / PROMPT * OUTPUT / config.backlog_drain_seconds / 5  # unbounded: 8x


def test_a_decode_scale_up_the_reversal_budget_would_lock_in_buys_no_flush() -> None:
    # Decode turned down a minute ago after one turn this hour: a scale-up now is the hour's second
    # turn, its replicas would stay up to an hour, and the flush is over within a drain.
    config = _config()
    snapshot = _snapshot(prompt_rate=120_000.0, queued=300_000.0, prefill_ready=4)
    free = _state(queued=100_000.0)
    locked = free.model_copy(
        update={
            "decode": RoleState(
                last_direction="down", reversal_times=(NOW - 60.0,), last_change_at=NOW - 60.0
            )
        }
    )
    load_free, load_locked = _load(snapshot, free, config), _load(snapshot, locked, config)
    assert load_free.flush_d > 0.0
    assert load_locked.flush_d == 0.0
    assert load_locked.sized["decode"] == pytest.approx(load_locked.forecast["decode"])
