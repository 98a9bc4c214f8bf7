"""Requests held at the router while a role they need has no ready worker (scale to zero).

A role the autoscaler scaled to zero, or whose pods are still starting, has no worker to route to.
Instead of a 503 at once, a new request waits here, bounded in number and in time, until every role
it needs has a ready worker; the wait is exported per role (`kvrelay_router_requests_waiting_for_
replicas`), which is what the autoscaler scales a role up from zero on. When the queue is full or the
wait runs out the client gets a 503 `no_ready_replicas` with a `Retry-After`.

    request ──► every role it needs has a ready worker? ──yes──► routed as usual
                      │ no
                      ├─ holding off (max wait 0) ─────────────► routed as usual (503 no_*_worker)
                      ├─ max_waiting already held ─────────────► 503 no_ready_replicas (queue_full)
                      └─ wait for a worker to turn ready ──────► routed as usual
                                 └─ max_wait_s passed ─────────► 503 no_ready_replicas (timeout)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvrelay_worker.router.errors import OpenAIError, server_error
from kvrelay_worker.router.metrics import RouterMetrics
from kvrelay_worker.router.pool import Role, WorkerPool

DEFAULT_MAX_WAITING = 256
DEFAULT_MAX_WAIT_S = 60.0


@dataclass(frozen=True)
class HoldPolicy:
    """At most `max_waiting` requests held at once, each for at most `max_wait_s` (0: no holding)."""

    max_waiting: int = DEFAULT_MAX_WAITING
    max_wait_s: float = DEFAULT_MAX_WAIT_S

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0 and self.max_waiting > 0

    @property
    def retry_after_s(self) -> int:
        """The refusal's Retry-After: one more full wait, by when the replica asked for has likely come
        (or the requests ahead of a full queue have been served or refused)."""
        return max(1, math.ceil(self.max_wait_s))


class WaitingRoom:
    """The requests held right now, per role they wait for, with the pool they wait on."""

    def __init__(self, pool: WorkerPool, policy: HoldPolicy, metrics: RouterMetrics) -> None:
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self.num_waiting = 0
        self.waiting_by_role: dict[Role, int] = {"prefill": 0, "decode": 0}

    def missing(self, roles: Sequence[Role]) -> list[Role]:
        """Which of `roles` have no ready worker now."""
        return [role for role in roles if not self.pool.has_ready(role)]

    async def until_ready(self, roles: Sequence[Role]) -> None:
        """Return once every role in `roles` has a ready worker, or at once when holding is off (the
        caller's routing then answers its own 503); raise a 503 `no_ready_replicas` when the queue is
        full or the wait runs out. A cancelled wait (the client left) leaves nothing behind."""
        missing = self.missing(roles)
        if not missing or not self.policy.enabled:
            return
        if self.num_waiting >= self.policy.max_waiting:
            raise self._refuse(
                "queue_full",
                f"{_no_ready(missing)}, and {self.num_waiting} requests already wait for one "
                f"(the router holds at most {self.policy.max_waiting})",
            )
        started = time.monotonic()
        deadline = started + self.policy.max_wait_s
        counted: set[Role] = set()
        self.num_waiting += 1
        try:
            while missing:
                self._count(counted, set(missing))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._refuse(
                        "timeout",
                        f"{_no_ready(missing)} after waiting {self.policy.max_wait_s:g} s "
                        "(the role is scaled to zero or its replicas are still starting)",
                    )
                await self.pool.wait_turned_ready(left)
                missing = self.missing(roles)
            self.metrics.replica_wait.observe(time.monotonic() - started)
        finally:
            self.num_waiting -= 1
            self._count(counted, set())

    def _count(self, counted: set[Role], now: set[Role]) -> None:
        """Move one request's share of the per-role gauge from the roles in `counted` to those in `now`."""
        for role in now - counted:
            self.waiting_by_role[role] += 1
        for role in counted - now:
            self.waiting_by_role[role] -= 1
        for role in now ^ counted:
            self.metrics.waiting_for_replicas.labels(self.metrics.model, role).set(self.waiting_by_role[role])
        counted.clear()
        counted.update(now)

    def _refuse(self, reason: str, why: str) -> OpenAIError:
        self.metrics.replica_wait_refusals.labels(self.metrics.model, reason).inc()
        retry = self.policy.retry_after_s
        return server_error(
            f"{why}; retry after {retry} s", code="no_ready_replicas", status=503,
            headers={"Retry-After": str(retry)},
        )  # fmt: skip


def _no_ready(roles: Sequence[Role]) -> str:
    """'no ready replica of the decode role', or '... of the prefill and decode roles'."""
    return f"no ready replica of the {' and '.join(roles)} role{'s' if len(roles) > 1 else ''}"
