"""Routing decisions as pure functions over the router's view of worker load."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    """What the router knows about one worker: its own in-flight work on it and its health."""

    address: str
    healthy: bool
    queued_prefill_tokens: int = 0  # prompt tokens of prefill calls in flight (prefill role)
    running_sequences: int = 0  # decode streams in flight (decode role)
    order: int = 0  # stable position; breaks ties so idle workers are used round-robin


def _eligible(loads: Sequence[WorkerLoad], exclude: Collection[str]) -> list[WorkerLoad]:
    return [w for w in loads if w.healthy and w.address not in exclude]


def choose_prefill(loads: Sequence[WorkerLoad], exclude: Collection[str] = (), turn: int = 0) -> str | None:
    """Least queued prefill tokens wins; ties rotate with `turn`. None when no healthy worker is left."""
    candidates = _eligible(loads, exclude)
    if not candidates:
        return None
    n = len(loads) or 1
    best = min(candidates, key=lambda w: (w.queued_prefill_tokens, (w.order - turn) % n))
    return best.address


def choose_decode(loads: Sequence[WorkerLoad], exclude: Collection[str] = (), turn: int = 0) -> str | None:
    """Fewest running sequences wins; ties rotate with `turn`. None when no healthy worker is left."""
    candidates = _eligible(loads, exclude)
    if not candidates:
        return None
    n = len(loads) or 1
    best = min(candidates, key=lambda w: (w.running_sequences, (w.order - turn) % n))
    return best.address
