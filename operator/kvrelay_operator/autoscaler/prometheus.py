"""Reads the contract's metric names (docs/wire-contracts.md section 4) from Prometheus into a
`MetricsSample`. Missing series become None and stale data is reported, so the policy holds.

Query building and result parsing are pure; only `PrometheusReader.read` does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvrelay_operator.autoscaler.types import MetricsSample

# A gauge every worker exports on every scrape: its newest sample time is the age of what
# Prometheus knows about the pools. With both pools scaled to zero no worker exports anything, so
# the router's hold gauge (exported from its start, at 0 for both roles) proves freshness then; a
# pool that has ready replicas but no series still holds the policy (its rates are missing).
_FRESHNESS_SERIES = "kvrelay_requests_running"
_ROUTER_FRESHNESS_SERIES = "kvrelay_router_requests_waiting_for_replicas"


class QuerySpec(BaseModel):
    """Which model to read and over what window."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="Value of the `model` label (the served model name).")
    window_seconds: int = Field(60, ge=10, description="Range for rate() and histogram quantiles.")
    quantile: float = Field(0.99, gt=0, lt=1)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def build_queries(spec: QuerySpec) -> dict[str, str]:
    """PromQL per `MetricsSample` field (plus `observed_at`), all aggregated to one value."""
    m = f'model="{_label(spec.model)}"'
    w = f"{spec.window_seconds}s"
    q = spec.quantile

    def select(role: str | None) -> str:  # the label matchers: the model's, and the role's if given
        return f'{m},role="{role}"' if role else m

    def quantile(name: str, role: str | None = None) -> str:
        return f"histogram_quantile({q}, sum by (le) (rate({name}_bucket{{{select(role)}}}[{w}])))"

    def mean(name: str) -> str:  # a histogram's mean over the window: rate of its sum over rate of its count
        return f"sum(rate({name}_sum{{{m}}}[{w}])) / sum(rate({name}_count{{{m}}}[{w}]))"

    def rate(name: str, role: str | None = None) -> str:
        return f"sum(rate({name}{{{select(role)}}}[{w}]))"

    def gauge(name: str, role: str, agg: str = "sum") -> str:
        return f"{agg}({name}{{{select(role)}}})"

    def over_window(name: str, role: str, fn: str, agg: str = "avg") -> str:  # agg of each series fn over w
        return f"{agg}({fn}({name}{{{select(role)}}}[{w}]))"

    def held(role: str) -> str:
        # The most held in the window, summed over routers: a request held between two decisions
        # (refused at its timeout, or served once a replica came) still counts as load.
        return over_window("kvrelay_router_requests_waiting_for_replicas", role, "max_over_time", "sum")

    return {
        # `or` keeps both sides' series (after timestamp() drops the names, a duplicate label set
        # on the right is dropped, never an error): the newest sample of either.
        "observed_at": (
            f"max(timestamp({_FRESHNESS_SERIES}{{{m}}}) or timestamp({_ROUTER_FRESHNESS_SERIES}{{{m}}}))"
        ),
        "ttft_seconds": quantile("kvrelay_time_to_first_token_seconds"),
        "itl_seconds": quantile("kvrelay_inter_token_latency_seconds"),
        "mean_itl_seconds": mean("kvrelay_inter_token_latency_seconds"),
        "request_rate": rate("kvrelay_requests_total"),
        "prompt_tokens_per_second": rate("kvrelay_prompt_tokens_total", "prefill"),
        "generation_tokens_per_second": rate("kvrelay_generation_tokens_total", "decode"),
        "queued_prefill_tokens": gauge("kvrelay_queued_prefill_tokens", "prefill"),
        "prefill_requests_waiting": gauge("kvrelay_requests_waiting", "prefill"),
        "decode_requests_waiting": gauge("kvrelay_requests_waiting", "decode"),
        "decode_requests_running": gauge("kvrelay_requests_running", "decode"),
        "kv_cache_usage_ratio": gauge("kvrelay_kv_cache_usage_ratio", "decode", "avg"),
        "kv_cache_usage_mean_ratio": over_window("kvrelay_kv_cache_usage_ratio", "decode", "avg_over_time"),
        "kv_cache_usage_peak_ratio": over_window("kvrelay_kv_cache_usage_ratio", "decode", "max_over_time"),
        "kv_transfer_seconds": mean("kvrelay_kv_transfer_seconds"),
        "prefill_busy_seconds_per_second": rate("kvrelay_prefill_seconds_sum", "prefill"),
        "prefill_queue_seconds": quantile("kvrelay_request_queue_seconds", "prefill"),
        "prefill_requests_waiting_for_replicas": held("prefill"),
        "decode_requests_waiting_for_replicas": held("decode"),
    }


# The label that tells the fields of one batched query's answer apart.
FIELD_LABEL = "kvrelay_field"


def batch_query(queries: Mapping[str, str]) -> str:
    """One PromQL query answering every field: each aggregated to one series, labelled with its field
    name, and joined with `or` (distinct label sets, so every series is kept). One request per model
    and decision instead of one per field."""
    return " or ".join(
        f'label_replace({q}, "{FIELD_LABEL}", "{name}", "", "")' for name, q in queries.items()
    )


def parse_batch(result: Any, fields: Iterable[str]) -> dict[str, float | None]:
    """Each field's value from a `batch_query` answer; None where its series is absent, NaN or infinite."""
    values: dict[str, float | None] = dict.fromkeys(fields)
    if not isinstance(result, list):
        return values
    for series in result:
        try:
            name = series["metric"][FIELD_LABEL]
        except (KeyError, TypeError):
            continue
        if name in values:
            values[name] = parse_scalar([series])
    return values


def parse_scalar(result: Any) -> float | None:
    """One value from an instant-vector answer; None when empty, NaN or infinite."""
    if not isinstance(result, list) or not result:
        return None
    try:
        value = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def to_sample(values: Mapping[str, float | None], window_seconds: float) -> MetricsSample | None:
    """Build the sample, or None when no worker or router series exists at all."""
    observed_at = values.get("observed_at")
    if observed_at is None:
        return None
    fields = {k: (max(v, 0.0) if v is not None else None) for k, v in values.items() if k != "observed_at"}
    return MetricsSample(observed_at=observed_at, window_seconds=window_seconds, **fields)


class PrometheusReader:
    """Synchronous reader (prometheus-api-client); call it from a thread in async code."""

    def __init__(self, url: str, spec: QuerySpec, timeout_seconds: int = 5) -> None:
        from prometheus_api_client import PrometheusConnect  # the operator extra; pure code stays free of it

        self.spec = spec
        self.queries = build_queries(spec)
        self.query = batch_query(self.queries)
        self._client = PrometheusConnect(url=url, disable_ssl=True)
        self._timeout = timeout_seconds

    def read_queued_prefill_tokens(self) -> float | None:
        """The one gauge the early check needs (autoscaler/early.py): a single-series query, not the batch."""
        result = self._client.custom_query(
            self.queries["queued_prefill_tokens"], params={"timeout": f"{int(self._timeout)}s"}
        )
        return parse_scalar(result)

    def read(self) -> MetricsSample | None:
        """Run the batched query; an unreachable Prometheus raises, an absent series reads as None."""
        result = self._client.custom_query(self.query, params={"timeout": f"{int(self._timeout)}s"})
        return to_sample(parse_batch(result, self.queries), float(self.spec.window_seconds))
