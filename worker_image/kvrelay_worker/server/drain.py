"""Graceful drain on SIGTERM: the contract the router keys on, and the pure drain state machine.

serving --SIGTERM--> draining --(nothing left | deadline | second signal)--> done

While draining the worker admits nothing, finishes what it runs and keeps serving the KV leases it
holds; whatever is still running at the deadline is ended with ``DEADLINE_MESSAGE``.
Wire contract (docs/wire-contracts.md section 3), gRPC status ``UNAVAILABLE`` in both cases:
- ``DRAINING_MESSAGE``: refused before anything was done; retry the whole request elsewhere.
- ``DEADLINE_MESSAGE``: admitted, then cut off; resume it elsewhere from the tokens already received.
On a stream opened before the drain the same strings come in-band (``error_message``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc

DRAIN_STATUS = grpc.StatusCode.UNAVAILABLE
DRAINING_MESSAGE = "draining: not admitting new requests"
DEADLINE_MESSAGE = "draining: deadline passed"
DEFAULT_DRAIN_SECONDS = 120.0


class Outcome(enum.Enum):
    """How a drain ended."""

    DRAINED = "drained"  # every request finished and every lease was claimed or expired
    DEADLINE = "deadline"
    CUT_SHORT = "cut short"  # a second SIGTERM/SIGINT


@dataclass(frozen=True)
class Remaining:
    """What a draining worker still waits for."""

    requests: int
    leases: int

    @property
    def empty(self) -> bool:
        return self.requests == 0 and self.leases == 0

    def __str__(self) -> str:
        return f"{self.requests} request(s) running, {self.leases} KV lease(s) held"


class DrainState:
    """Serving, then draining until a deadline; every decision takes ``now`` (monotonic seconds)."""

    def __init__(self, drain_seconds: float = DEFAULT_DRAIN_SECONDS) -> None:
        if drain_seconds < 0:
            raise ValueError(f"drain_seconds must be >= 0, got {drain_seconds}")
        self.drain_seconds = drain_seconds
        self.started_at: float | None = None
        self.cut_short = False

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    @property
    def deadline(self) -> float | None:
        return None if self.started_at is None else self.started_at + self.drain_seconds

    def signal(self, now: float) -> bool:
        """A stop signal: the first starts the drain (True), any later one cuts it short (False)."""
        if self.started_at is None:
            self.started_at = now
            return True
        self.cut_short = True
        return False

    def outcome(self, now: float, remaining: Remaining) -> Outcome | None:
        """None while the drain should go on."""
        if self.started_at is None:
            return None
        if remaining.empty:
            return Outcome.DRAINED
        if self.cut_short:
            return Outcome.CUT_SHORT
        if now >= self.started_at + self.drain_seconds:
            return Outcome.DEADLINE
        return None

    def elapsed(self, now: float) -> float:
        return 0.0 if self.started_at is None else now - self.started_at
