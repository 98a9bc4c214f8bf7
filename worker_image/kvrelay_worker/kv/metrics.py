"""KV relay Prometheus metrics (contract section 4), registered once in the default registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..metrics import per_registry

_LABELS = ("model", "role")
_TRANSFER_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True)
class _Families:
    transfer_seconds: Histogram
    transfer_bytes: Counter
    transfer_failures: Counter
    held_blocks: Gauge
    held_bytes: Gauge


def _make_families(registry: CollectorRegistry) -> _Families:
    return _Families(
        transfer_seconds=Histogram(
            "kvrelay_kv_transfer_seconds",
            "Time to relay one request's KV cache (claim, read, release notice), reader side.",
            _LABELS,
            buckets=_TRANSFER_BUCKETS,
            registry=registry,
        ),
        transfer_bytes=Counter(
            "kvrelay_kv_transfer_bytes", "KV cache bytes relayed, reader side.", _LABELS, registry=registry
        ),
        transfer_failures=Counter(
            "kvrelay_kv_transfer_failures",
            "Failed KV fetches by reason (timeout, holder_unreachable, expired, unknown_handle, ...).",
            (*_LABELS, "reason"),
            registry=registry,
        ),
        held_blocks=Gauge(
            "kvrelay_kv_held_blocks", "KV blocks held under a lease for readers.", _LABELS, registry=registry
        ),
        held_bytes=Gauge(
            "kvrelay_kv_held_bytes", "KV bytes held under a lease for readers.", _LABELS, registry=registry
        ),
    )


_families = per_registry(_make_families)


class KVMetrics:
    """The relay's series for one (model, role); pass a registry to isolate tests."""

    def __init__(self, model: str, role: str, registry: CollectorRegistry | None = None) -> None:
        fam = _families(registry)
        self.transfer_seconds = fam.transfer_seconds.labels(model, role)
        self.transfer_bytes = fam.transfer_bytes.labels(model, role)
        self._failures = fam.transfer_failures
        self._model, self._role = model, role
        self.held_blocks = fam.held_blocks.labels(model, role)
        self.held_bytes = fam.held_bytes.labels(model, role)

    def failure(self, reason: str) -> None:
        self._failures.labels(self._model, self._role, reason).inc()

    def set_held(self, blocks: int, nbytes: int) -> None:
        self.held_blocks.set(blocks)
        self.held_bytes.set(nbytes)
