"""Worker Prometheus series (wire contract section 4); the KV relay's own series live in ``kv.metrics``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from kvrelay_worker.engine.core import EngineStats

T = TypeVar("T")
_LABELS = ("model", "role")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class _Families:
    queue_seconds: Histogram
    prefill_seconds: Histogram
    prompt_tokens: Counter
    prompt_tokens_computed: Counter
    generation_tokens: Counter
    running: Gauge
    waiting: Gauge
    queued_prefill_tokens: Gauge
    kv_cache_usage: Gauge
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    prefix_cache_evictions: Counter
    prefix_cache_blocks: Gauge


def _make(registry: CollectorRegistry) -> _Families:
    def hist(name: str, doc: str) -> Histogram:
        return Histogram(name, doc, _LABELS, buckets=_LATENCY_BUCKETS, registry=registry)

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, _LABELS, registry=registry)

    return _Families(
        queue_seconds=hist("kvrelay_request_queue_seconds", "Time from arrival to first scheduled step."),
        prefill_seconds=hist("kvrelay_prefill_seconds", "Time from first scheduled step to the first token."),
        prompt_tokens=Counter("kvrelay_prompt_tokens", "Prompt tokens accepted.", _LABELS, registry=registry),
        prompt_tokens_computed=Counter(
            "kvrelay_prompt_tokens_computed",
            "Prompt tokens this worker computed (prefill, recompute); KV relayed to it is not counted.",
            _LABELS,
            registry=registry,
        ),
        generation_tokens=Counter(
            "kvrelay_generation_tokens", "Tokens generated.", _LABELS, registry=registry
        ),
        running=gauge("kvrelay_requests_running", "Requests in the running batch."),
        waiting=gauge("kvrelay_requests_waiting", "Requests queued (including those waiting for remote KV)."),
        queued_prefill_tokens=gauge(
            "kvrelay_queued_prefill_tokens", "Prompt tokens queued, not yet computed."
        ),
        kv_cache_usage=gauge("kvrelay_kv_cache_usage_ratio", "Fraction of KV cache blocks in use, 0..1."),
        prefix_cache_queries=Counter(
            "kvrelay_prefix_cache_queries",
            "Tokens of admitted requests looked up in the prefix cache.",
            _LABELS,
            registry=registry,
        ),
        prefix_cache_hits=Counter(
            "kvrelay_prefix_cache_hits",
            "Looked-up tokens whose KV was found cached (not computed).",
            _LABELS,
            registry=registry,
        ),
        prefix_cache_evictions=Counter(
            "kvrelay_prefix_cache_evictions",
            "Cached KV blocks handed out for other KV.",
            _LABELS,
            registry=registry,
        ),
        prefix_cache_blocks=gauge(
            "kvrelay_prefix_cache_blocks", "KV blocks in the prefix cache (in use or free)."
        ),
    )


def per_registry(make: Callable[[CollectorRegistry], T]) -> Callable[[CollectorRegistry | None], T]:
    """Metric families made once for the default registry (names register once per process), and
    afresh for any other registry (tests isolate themselves with their own)."""
    made: dict[int, T] = {}

    def families(registry: CollectorRegistry | None) -> T:
        if registry is not None and registry is not REGISTRY:
            return make(registry)
        if not made:
            made[0] = make(REGISTRY)
        return made[0]

    return families


_families = per_registry(_make)


class WorkerMetrics:
    """The worker's series bound to one (model, role)."""

    def __init__(self, model: str, role: str, registry: CollectorRegistry | None = None) -> None:
        f = _families(registry)
        labels = (model, role)
        self.queue_seconds = f.queue_seconds.labels(*labels)
        self.prefill_seconds = f.prefill_seconds.labels(*labels)
        self.prompt_tokens = f.prompt_tokens.labels(*labels)
        self.prompt_tokens_computed = f.prompt_tokens_computed.labels(*labels)
        self.generation_tokens = f.generation_tokens.labels(*labels)
        self.running = f.running.labels(*labels)
        self.waiting = f.waiting.labels(*labels)
        self.queued_prefill_tokens = f.queued_prefill_tokens.labels(*labels)
        self.kv_cache_usage = f.kv_cache_usage.labels(*labels)
        self.prefix_cache_queries = f.prefix_cache_queries.labels(*labels)
        self.prefix_cache_hits = f.prefix_cache_hits.labels(*labels)
        self.prefix_cache_evictions = f.prefix_cache_evictions.labels(*labels)
        self.prefix_cache_blocks = f.prefix_cache_blocks.labels(*labels)
        # the engine's prefix-cache totals already counted: the counters grow by the difference
        self._cache_totals_seen = (0, 0, 0)

    def set_stats(self, stats: EngineStats) -> None:
        """Gauges from the engine's latest stats; the prefix-cache counters from its running totals."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.queued_prefill_tokens.set(stats.num_queued_prefill_tokens)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_cache_blocks.set(stats.num_cached_blocks)
        totals = (stats.num_cache_query_tokens, stats.num_cache_hit_tokens, stats.num_cache_evictions)
        counters = (self.prefix_cache_queries, self.prefix_cache_hits, self.prefix_cache_evictions)
        for counter, total, seen in zip(counters, totals, self._cache_totals_seen, strict=True):
            if total > seen:
                counter.inc(total - seen)
        self._cache_totals_seen = totals
