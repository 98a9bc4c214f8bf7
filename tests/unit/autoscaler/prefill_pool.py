"""A prefill pool under load, as the autoscaler's tests of queueing and TTFT misses build it: fixed
per-replica capacities (nothing learned), one metrics window, the last decision 30 s ago."""

from __future__ import annotations

from typing import Any

from kvrelay_operator.autoscaler.load import Load, estimate_load
from kvrelay_operator.autoscaler.types import (
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    Snapshot,
)

NOW = 10_000.0
PREFILL_CAP = 10_000.0  # prompt tokens/s one prefill replica serves


def config(ttft_slo: float) -> PolicyConfig:
    """TTFT `ttft_slo`, ITL 60 ms, fixed capacities: 10k prompt and 2k generated tokens/s per replica."""
    return PolicyConfig(
        ttft_slo_seconds=ttft_slo,
        itl_slo_seconds=0.06,
        prefill=RoleLimits(max_replicas=64),
        decode=RoleLimits(max_replicas=64),
        prefill_tokens_per_second=PREFILL_CAP,
        decode_tokens_per_second=2_000.0,
        learn_capacity=False,
    )


def metrics(ttft: float, prompt: float, rate: float, queued: float, **extra: Any) -> MetricsSample:
    """A window with `rate` prompt tokens/s of `prompt`-token requests and `queued` tokens waiting."""
    return MetricsSample(
        observed_at=NOW,
        window_seconds=60.0,
        ttft_seconds=ttft,
        itl_seconds=0.03,
        request_rate=rate / prompt,
        prompt_tokens_per_second=rate,
        generation_tokens_per_second=1_000.0,
        queued_prefill_tokens=queued,
        prefill_requests_waiting=queued / prompt,
        decode_requests_waiting=0.0,
        **extra,
    )


def snapshot(window: MetricsSample, ready: int) -> Snapshot:
    """`ready` prefill replicas (none loading) and two decode replicas."""
    return Snapshot(
        metrics=window,
        prefill=RoleReplicas(current=ready, ready=ready),
        decode=RoleReplicas(current=2, ready=2),
    )


def state(last_queued: float, ready: int) -> PolicyState:
    """The last decision 30 s ago, which saw `last_queued` tokens waiting on `ready` replicas."""
    return PolicyState(
        last_metrics_at=NOW - 30.0, last_queued_prefill_tokens=last_queued, last_prefill_ready=ready
    )


def load(policy: PolicyConfig, window: MetricsSample, ready: int, last_queued: float) -> Load:
    """The demand phase's `Load` for that pool."""
    before = state(last_queued, ready)
    roles = {"prefill": before.prefill, "decode": before.decode}
    return estimate_load(snapshot(window, ready), window, before, roles, policy, NOW)
