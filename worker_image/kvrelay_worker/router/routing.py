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
    cached_prefix_tokens: int = 0  # of the prompt being routed, what this worker likely holds (prefill)
    cached_prefix_fraction: float = 0.0  # the same as a share of the stream's input tokens, 0..1 (decode)


def _eligible(loads: Sequence[WorkerLoad], exclude: Collection[str]) -> list[WorkerLoad]:
    return [w for w in loads if w.healthy and w.address not in exclude]


def _rotation(loads: Sequence[WorkerLoad], turn: int) -> dict[str, int]:
    """Each worker's place in this turn's round (0 goes first): ranks by `order`, shifted by `turn`.

    Ranks, not the orders themselves: orders come from one counter across roles and re-discoveries,
    so a pool's orders can share a parity (1 and 3), and `(order - turn) % 2` would never rotate.
    """
    ranked = sorted(loads, key=lambda w: (w.order, w.address))
    return {w.address: (rank - turn) % len(ranked) for rank, w in enumerate(ranked)}


def choose_prefill(
    loads: Sequence[WorkerLoad], exclude: Collection[str] = (), turn: int = 0, prefix_weight: float = 0.0
) -> str | None:
    """The worker that would reach this prompt's first token soonest: fewest prompt tokens queued there,
    minus ``prefix_weight`` x the tokens of this prompt it already holds (it computes only the rest).
    Weight 0: least queued. Ties rotate with `turn`. None when no healthy worker is left."""
    candidates = _eligible(loads, exclude)
    if not candidates:
        return None
    place = _rotation(loads, turn)

    def cost(w: WorkerLoad) -> tuple[float, int]:
        return (w.queued_prefill_tokens - prefix_weight * w.cached_prefix_tokens, place[w.address])

    return min(candidates, key=cost).address


def choose_decode(
    loads: Sequence[WorkerLoad], exclude: Collection[str] = (), turn: int = 0, prefix_weight: float = 0.0
) -> str | None:
    """Fewest running streams, less ``prefix_weight`` x the share of the input it likely holds: a decode
    worker that already holds the whole prompt counts as if it ran W fewer streams (it fetches only the
    blocks it lacks). Weight 0: fewest streams. Ties rotate with `turn`. None: no healthy worker left."""
    candidates = _eligible(loads, exclude)
    if not candidates:
        return None
    place = _rotation(loads, turn)

    def cost(w: WorkerLoad) -> tuple[float, int]:
        return (w.running_sequences - prefix_weight * w.cached_prefix_fraction, place[w.address])

    return min(candidates, key=cost).address


def cached_fraction(cached_tokens: int, num_tokens: int) -> float:
    """The share of a stream's input tokens a worker likely holds, in [0, 1] (0 for an empty input)."""
    if num_tokens <= 0:
        return 0.0
    return min(1.0, max(0.0, cached_tokens / num_tokens))
