"""The router's hold (scale to zero): a request that arrives while a role it needs has no ready replica
waits at the router, as `worker_image/kvrelay_worker/router/hold.py` does it.

    arrival ──► every role has a ready replica? ──yes──► dispatched (prefill queue)
                      │ no
                      ├─ max_waiting already held ─────► refused (503 queue_full)
                      └─ held ──► both roles ready ────► dispatched, oldest first; TTFT counts the wait
                            └─ max_wait_seconds passed ► refused (503 timeout)

The per-role held count is the router's `kvrelay_router_requests_waiting_for_replicas` gauge; the
autoscaler reads its `max_over_time` over the rate window (prometheus.py), kept here as a history.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import simpy

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class HoldBounds:
    """How many requests the router holds at once and for how long (the chart's defaults,
    spec.router.maxWaitingRequests / maxWaitSeconds); 0 for either turns holding off."""

    max_waiting: int = 256
    max_wait_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_waiting < 0 or self.max_wait_seconds < 0:
            raise ValueError(f"hold bounds must be >= 0, got {self}: use 0 to turn holding off")

    @property
    def enabled(self) -> bool:
        """Holding is on (the router answers a 503 at once otherwise)."""
        return self.max_waiting > 0 and self.max_wait_seconds > 0


class HeldRequest(Protocol):
    """What the hold reads and writes on a request (the cluster's `SimRequest`)."""

    dispatched_at: float | None
    refused: str | None
    waited_for_replicas: bool


class GaugeHistory:
    """One gauge's value over time, so a scrape can take its maximum over a window (`max_over_time`):
    a request held and answered between two decisions still shows as load."""

    def __init__(self, start: float) -> None:
        self._changes: deque[tuple[float, float]] = deque([(start, 0.0)])

    @property
    def value(self) -> float:
        """The gauge now."""
        return self._changes[-1][1]

    def set(self, at: float, value: float) -> None:
        """The gauge takes `value` from `at` on (times never go back)."""
        if value != self._changes[-1][1]:
            self._changes.append((at, value))

    def max_over(self, since: float) -> float:
        """Highest value the gauge had from `since` until now; forgets what lies before `since`
        (windows only move forward)."""
        while len(self._changes) > 1 and self._changes[1][0] <= since:
            self._changes.popleft()
        return max(value for _, value in self._changes)


class RouterHold:
    """The requests held right now, oldest first, and the refusals so far."""

    def __init__(
        self,
        env: simpy.Environment,
        bounds: HoldBounds,
        missing: Callable[[], list[str]],
        dispatch: Callable[[HeldRequest], None],
    ) -> None:
        self.env = env
        self.bounds = bounds
        self._missing = missing
        self._dispatch = dispatch
        self.held: deque[HeldRequest] = deque()
        self.refused = {"queue_full": 0, "timeout": 0, "not_held": 0}
        self.gauges = {role: GaugeHistory(env.now) for role in ROLES}

    def admit(self, request: HeldRequest) -> None:
        """Hold a request that arrived while a role it needs has no ready replica, or refuse it."""
        request.waited_for_replicas = True
        if not self.bounds.enabled:
            self._refuse(request, "not_held")  # the router's own 503 no_prefill/decode_worker
            return
        if len(self.held) >= self.bounds.max_waiting:
            self._refuse(request, "queue_full")
            return
        self.held.append(request)
        self.env.process(self._deadline(request))
        self.update()

    def replicas_changed(self) -> None:
        """A replica turned ready or went: dispatch everything held once no role is missing."""
        if self.held and not self._missing():
            while self.held:
                self._dispatch(self.held.popleft())
        self.update()

    def update(self) -> None:
        """The per-role gauge: held requests count for each role they still wait for."""
        missing = set(self._missing())
        for role in ROLES:
            self.gauges[role].set(self.env.now, float(len(self.held)) if role in missing else 0.0)

    def _deadline(self, request: HeldRequest):
        yield self.env.timeout(self.bounds.max_wait_seconds)
        if request.dispatched_at is None and request.refused is None:
            self.held.remove(request)  # at most max_waiting long
            self._refuse(request, "timeout")
            self.update()

    def _refuse(self, request: HeldRequest, reason: str) -> None:
        request.refused = reason
        self.refused[reason] += 1
