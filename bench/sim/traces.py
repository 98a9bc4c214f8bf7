"""Request traces: synthetic shapes (steps, a sine, bursts) with lengths drawn from a public trace,
and copies of a trace superposed. Trace files are read by `trace_file.py`.

A trace is a list of `(arrival_seconds, prompt_tokens, output_tokens)` sorted by arrival.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Request = tuple[float, int, int]


@dataclass(frozen=True)
class Trace:
    """A named request list plus the times where its offered load changes on purpose."""

    name: str
    requests: list[Request]
    step_times: list[float] = field(default_factory=list)

    @property
    def duration_seconds(self) -> float:
        """Arrival time of the last request."""
        return self.requests[-1][0] if self.requests else 0.0


def traces_dir(repo_root: Path) -> Path:
    """`KVRELAY_TRACES_DIR`, else `../shared/traces` next to the repository."""
    env = os.environ.get("KVRELAY_TRACES_DIR")
    return Path(env) if env else (repo_root / ".." / "shared" / "traces").resolve()


def superpose(rows: list[Request], copies: int, seed: int) -> list[Request]:
    """Scale the rate by `copies` keeping the minute-scale shape (the slow ramp).

    Each extra copy moves every request by an independent U(-30 s, 30 s) shift: copies of one
    user's burst must not land on the same second (that would multiply burstiness by `copies`),
    while the load over minutes stays the trace's.
    """
    if copies <= 1:
        return sorted(rows)
    rng = np.random.default_rng(seed)
    out = list(rows)
    for _ in range(copies - 1):
        shifts = rng.uniform(-30.0, 30.0, size=len(rows))
        out.extend((max(at + float(s), 0.0), p, o) for (at, p, o), s in zip(rows, shifts, strict=True))
    out.sort()
    return out


def synthetic(
    name: str,
    rate_at: list[tuple[float, float]],
    duration_seconds: float,
    lengths: list[tuple[int, int]],
    seed: int = 0,
    sine_period_seconds: float | None = None,
) -> Trace:
    """Poisson arrivals with a piecewise-constant rate (or a sine around it); lengths resampled.

    `rate_at` is [(start_seconds, requests_per_second), ...]; a sine multiplies the rate by
    1 + 0.6 sin(2 pi t / period).
    """
    rng = np.random.default_rng(seed)
    peak = max(r for _, r in rate_at) * (1.6 if sine_period_seconds else 1.0)
    # Thinning: draw at the peak rate, keep each arrival with probability rate(t) / peak.
    num = rng.poisson(peak * duration_seconds)
    times = np.sort(rng.uniform(0, duration_seconds, size=num))
    keep = rng.uniform(0, 1, size=num) * peak < np.array(
        [_rate(t, rate_at, sine_period_seconds) for t in times]
    )
    times = times[keep]
    picks = rng.integers(0, len(lengths), size=len(times))
    requests = [(float(t), lengths[i][0], lengths[i][1]) for t, i in zip(times, picks, strict=True)]
    steps = [] if sine_period_seconds else [t for t, _ in rate_at[1:]]
    return Trace(name, requests, steps)


def _rate(t: float, rate_at: list[tuple[float, float]], sine_period: float | None) -> float:
    rate = 0.0
    for start, value in rate_at:
        if t >= start:
            rate = value
    if sine_period:
        rate *= 1 + 0.6 * math.sin(2 * math.pi * t / sine_period)
    return rate


def idle_bursts(
    name: str,
    lengths: list[tuple[int, int]],
    burst_rate: float,
    idle_seconds: float = 1200.0,
    burst_seconds: float = 300.0,
    cycles: int = 3,
    seed: int = 0,
) -> Trace:
    """`cycles` times: `idle_seconds` without a single request, then `burst_seconds` of Poisson
    arrivals at `burst_rate` (a model used now and then: what scale to zero is for)."""
    if idle_seconds <= 0 or burst_seconds <= 0 or cycles < 1 or burst_rate <= 0:
        raise ValueError("idle_bursts needs idle_seconds, burst_seconds, burst_rate > 0 and cycles >= 1")
    period = idle_seconds + burst_seconds
    rate_at: list[tuple[float, float]] = []
    for k in range(cycles):
        rate_at += [(k * period, 0.0), (k * period + idle_seconds, burst_rate)]
    return synthetic(name, rate_at, cycles * period, lengths, seed)


def synthetic_suite(
    lengths: list[tuple[int, int]], base_rate: float, quick: bool, seed: int = 0
) -> list[Trace]:
    """Staircase up/down (+25% steps), one x3 step up/down, sine, idle-then-spike, and idle gaps
    with bursts (for scale to zero).

    `quick` keeps only the staircase. A single x3 step (and a spike out of idle) cannot be met at
    99% by any purely reactive policy while a new replica takes a minute to load; they are kept
    to show how each policy degrades, not as a bar.
    """
    minute = 60.0
    levels = [1.25**k for k in (0, 1, 2, 3, 4, 5, 4, 3, 2, 1, 0)]
    staircase = synthetic(
        "staircase_up_down",
        [(4 * minute * i, base_rate * level) for i, level in enumerate(levels)],
        4 * minute * len(levels),
        lengths,
        seed,
    )
    if quick:
        return [staircase]
    step = synthetic(
        "step_up_down_x3",
        [(0, base_rate), (10 * minute, 3 * base_rate), (20 * minute, base_rate)],
        30 * minute,
        lengths,
        seed + 1,
    )
    sine = synthetic(
        "sine", [(0, 2 * base_rate)], 60 * minute, lengths, seed + 2, sine_period_seconds=20 * minute
    )
    spike = synthetic(
        "idle_then_spike",
        [(0, 0.05 * base_rate), (15 * minute, 3 * base_rate), (30 * minute, 0.05 * base_rate)],
        45 * minute,
        lengths,
        seed + 3,
    )
    # Three times: 20 minutes without a request, then 5 minutes at a fifth of the base rate, a load
    # one replica per role nearly holds, so what scale to zero costs is the cold start, not a spike.
    zero = idle_bursts("idle_burst_zero", lengths, 0.2 * base_rate, seed=seed + 4)
    return [staircase, step, sine, spike, zero]
