"""Router Prometheus metrics (names fixed by docs/wire-contracts.md section 4)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Token latencies on CPU range from sub-millisecond to seconds; TTFT up to a minute under load.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RESUME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A held request waits for a pod to start: a process on CPU in seconds, a GPU model load in minutes.
_REPLICA_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class RouterMetrics:
    """One registry per router app, so several apps in one process (tests) do not collide."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.ttft = Histogram(
            "kvrelay_time_to_first_token_seconds",
            "Request arrival to first token sent",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model)
        self.itl = Histogram(
            "kvrelay_inter_token_latency_seconds",
            "Time between consecutive tokens of one request",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        ).labels(model)
        self.requests = Counter(
            "kvrelay_requests_total",
            "Finished requests by status",
            ["model", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "kvrelay_prompt_tokens_total",
            "Prompt tokens of admitted requests",
            ["model"],
            registry=self.registry,
        ).labels(model)
        self.generation_tokens = Counter(
            "kvrelay_generation_tokens_total", "Tokens generated", ["model"], registry=self.registry
        ).labels(model)
        self.migrations = Counter(
            "kvrelay_router_migrations_total",
            "Requests resumed on another decode worker, by why the previous one failed",
            ["model", "reason"],
            registry=self.registry,
        )
        self.migration_failures = Counter(
            "kvrelay_router_migration_failures_total",
            "Requests ended with an error after losing their decode worker (limit reached, none left)",
            ["model", "reason"],
            registry=self.registry,
        )
        self.resume = Histogram(
            "kvrelay_router_resume_seconds",
            "Decode worker failure noticed to the next token of the resumed request",
            ["model", "via"],
            buckets=_RESUME_BUCKETS,
            registry=self.registry,
        )

        self.prefill_routing = Counter(
            "kvrelay_router_prefill_routing",
            "Prefill worker choices: `prefix` if the chosen one likely held some of the prompt, else `load`",
            ["model", "reason"],
            registry=self.registry,
        )
        self.routed_prefix_tokens = Counter(
            "kvrelay_router_prefix_hit_tokens",
            "Prompt tokens the chosen prefill worker likely held (the router's estimate)",
            ["model"],
            registry=self.registry,
        ).labels(model)
        self.decode_routing = Counter(
            "kvrelay_router_decode_routing",
            "Decode worker choices: `prefix` if the chosen one likely held some of the input, else `load`",
            ["model", "reason"],
            registry=self.registry,
        )
        self.decode_prefix_tokens = Counter(
            "kvrelay_router_decode_prefix_hit_tokens",
            "Input tokens the chosen decode worker likely held (the router's estimate)",
            ["model"],
            registry=self.registry,
        ).labels(model)

        self.waiting_for_replicas = Gauge(
            "kvrelay_router_requests_waiting_for_replicas",
            "Requests held because a role they need has no ready worker (scaled to zero or starting)",
            ["model", "role"],
            registry=self.registry,
        )
        for role in ("prefill", "decode"):
            # Exported at 0 from the start: with both pools at zero these are the model's only fresh
            # series, which the autoscaler reads to know its metrics are current.
            self.waiting_for_replicas.labels(model, role).set(0)
        self.replica_wait_refusals = Counter(
            "kvrelay_router_replica_wait_refusals_total",
            "Held requests answered 503 no_ready_replicas: the hold queue was full, or the wait timed out",
            ["model", "reason"],
            registry=self.registry,
        )
        self.replica_wait = Histogram(
            "kvrelay_router_replica_wait_seconds",
            "How long a held request waited until every role it needs had a ready worker (served ones only)",
            ["model"],
            buckets=_REPLICA_WAIT_BUCKETS,
            registry=self.registry,
        ).labels(model)

    def routed_prefill(self, cached_prefix_tokens: int) -> None:
        """One prefill worker chosen, holding (by the router's estimate) this many of the prompt's tokens."""
        self.prefill_routing.labels(self.model, "prefix" if cached_prefix_tokens else "load").inc()
        self.routed_prefix_tokens.inc(cached_prefix_tokens)

    def routed_decode(self, cached_prefix_tokens: int) -> None:
        """One decode worker chosen, holding (by the router's estimate) this many of the input tokens."""
        self.decode_routing.labels(self.model, "prefix" if cached_prefix_tokens else "load").inc()
        self.decode_prefix_tokens.inc(cached_prefix_tokens)

    def request_done(self, status: str) -> None:
        """status: success | client_error | server_error | cancelled."""
        self.requests.labels(self.model, status).inc()

    def migrated(self, reason: str) -> None:
        """reason: worker_lost | draining | stalled."""
        self.migrations.labels(self.model, reason).inc()

    def migration_failed(self, reason: str) -> None:
        """reason: limit (too many migrations) | no_worker (no decode worker left to resume on)."""
        self.migration_failures.labels(self.model, reason).inc()

    def resumed(self, via: str, seconds: float) -> None:
        """via: prefill (re-prefilled and relayed) | decode (recomputed on the decode worker)."""
        self.resume.labels(self.model, via).observe(seconds)
