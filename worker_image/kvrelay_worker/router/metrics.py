"""Router Prometheus metrics (names fixed by docs/wire-contracts.md section 4)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Token latencies on CPU range from sub-millisecond to seconds; TTFT up to a minute under load.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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

    def request_done(self, status: str) -> None:
        """status: success | client_error | server_error | cancelled."""
        self.requests.labels(self.model, status).inc()
