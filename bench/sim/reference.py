"""The clairvoyant-with-cold-start reference: the smallest per-minute replica schedule, known in
advance, that replays at >= 99% in both SLOs with at most 2 reversals per role per hour.

It knows the whole trace but pays what every policy pays: a replica serves one cold start after it
is requested and costs GPU-hours from then, the decision interval and the reversal bar are the
same. The search (`search_reference`):

1. Start: each minute's need from the static-peak formula (`minute_sizes`), asked for one minute
   (the 60 s cold start) ahead, covered with the fewest replica-minutes under the reversal limit by
   dynamic programming (`cheapest_cover`).
2. Repair: while the replay misses 99%, raise the maximal constant runs of the role that misses
   most, at the minute that misses most and the one before it (the replicas that would have had to
   be requested then). Raising a whole run never adds a reversal.
3. Descend: lower whole runs by one replica, then remove single replica-minutes, keeping each
   change the replay still passes. A change that would break the reversal limit or go below the
   role's minimum is not admissible.
4. Certify: every admissible single replica-minute removal from the final schedule is replayed and
   must drop below 99%; any that does not is taken and the search goes on. So the schedule cannot
   be loosened by one replica-minute, and the result carries the count of removals it checked.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence

from kvrelay_operator.autoscaler.types import Snapshot

from sim.cluster import FrontendStats
from sim.replay import (
    REVERSAL_WINDOW_SECONDS,
    Scenario,
    Timeline,
    max_in_window,
    minute_sizes,
    reversal_times,
    run,
)

MINUTE = 60.0
TARGET = 0.99
REVERSALS_PER_HOUR = 2
_MAX_REPAIRS = 60
TAIL_MINUTES = 2  # the replay runs 120 s past the last arrival

Schedule = list[tuple[int, int]]


class ScheduleController:
    """Follows a per-minute (prefill, decode) allocation known in advance."""

    def __init__(self, name: str, schedule: Schedule) -> None:
        self.name = name
        self.schedule = schedule

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """The allocation of the minute `now` falls in (the last one past the end)."""
        return self.schedule[min(int(now // MINUTE), len(self.schedule) - 1)]


def cheapest_cover(needs: Sequence[int], max_reversals: int) -> list[int]:
    """Fewest replica-minutes of counts >= each minute's need with <= `max_reversals` reversals
    (dynamic programming over (level, last direction, reversals so far))."""
    levels = sorted(set(needs))
    State = tuple[int, int, int]
    best: dict[State, tuple[int, State | None]] = {(lv, 0, 0): (lv, None) for lv in levels if lv >= needs[0]}
    back: list[dict[State, tuple[int, State | None]]] = [best]
    for need in needs[1:]:
        step: dict[State, tuple[int, State | None]] = {}
        for state, (cost, _) in best.items():
            level, direction, flips = state
            for new in levels:
                if new < need:
                    continue
                move = (new > level) - (new < level)
                turned = move != 0 and direction != 0 and move != direction
                key = (new, move or direction, flips + int(turned))
                if key[2] <= max_reversals and cost + new < step.get(key, (math.inf, None))[0]:
                    step[key] = (cost + new, state)
        best = step
        back.append(best)
    state: State | None = min(best, key=lambda s: best[s][0])
    path: list[int] = []
    for table in reversed(back):
        assert state is not None
        path.append(state[0])
        state = table[state][1]
    return path[::-1]


@dataclasses.dataclass
class ReferenceResult:
    """The reference schedule, its replay line, and how the search got there."""

    schedule: Schedule
    result: dict[str, object]
    replays: int
    certified_removals: int
    start_gpu_hours: float


def turns_in_an_hour(counts: Sequence[int]) -> int:
    """Most reversals of a per-minute schedule within any hour (as `replay.max_in_window` counts)."""
    events = [
        (MINUTE * k, 1 if b > a else -1) for k, (a, b) in enumerate(itertools.pairwise(counts), 1) if b != a
    ]
    return max_in_window(reversal_times(events), REVERSAL_WINDOW_SECONDS)


def _within_bar(counts: Sequence[int]) -> bool:
    return turns_in_an_hour(counts) <= REVERSALS_PER_HOUR


def initial_schedule(scenario: Scenario) -> Schedule:
    """Each minute's need asked for one cold start ahead, covered under the reversal limit."""
    needs = minute_sizes(scenario) + [(scenario.min_replicas, scenario.min_replicas)] * TAIL_MINUTES
    ahead = [
        tuple(max(needs[k][role], needs[min(k + 1, len(needs) - 1)][role]) for role in (0, 1))
        for k in range(len(needs))
    ]
    hours = max(1, round(len(ahead) * MINUTE / REVERSAL_WINDOW_SECONDS))
    out = []
    for role in (0, 1):
        needs_of_role = [a[role] for a in ahead]
        counts = cheapest_cover(needs_of_role, REVERSALS_PER_HOUR * hours)
        if not _within_bar(counts):  # a long trace's turns bunched into one hour: spread the limit
            counts = cheapest_cover(needs_of_role, REVERSALS_PER_HOUR)
        out.append(counts)
    return list(zip(out[0], out[1], strict=True))


def search_reference(
    scenario: Scenario, log: Callable[[str], None] = lambda _: None, seeds: Sequence[Schedule] = ()
) -> ReferenceResult:
    """The smallest schedule this search finds that replays at >= 99% within the reversal limit.

    `seeds` are further passing schedules found elsewhere (the reactive family's, bench/sim/reactive.py):
    each admissible one that is cheaper than the search's result is descended and certified in turn,
    so the reference is never dearer than a schedule the bench has seen pass."""
    replays = 0

    def replay(schedule: Schedule) -> tuple[dict[str, object], Timeline]:
        nonlocal replays
        replays += 1
        timeline = Timeline()
        result = run(scenario, ScheduleController("clairvoyant_cold_start", schedule), schedule[0], timeline)
        return result, timeline

    schedule = initial_schedule(scenario)
    result, timeline = replay(schedule)
    start_hours = float(result["gpu_hours"])  # type: ignore[arg-type]
    for _ in range(_MAX_REPAIRS):
        if _passes(result):
            break
        role, minute = _worst_miss(timeline)
        for k in {max(minute - 1, 0), minute}:
            schedule = _raise_run(schedule, role, k, scenario.max_replicas)
        result, timeline = replay(schedule)
        log(f"repair {role} minute {minute}: {result['slo_attainment']} {result['gpu_hours']} GPU-h")
    if not _passes(result):
        raise RuntimeError(f"{scenario.trace.name}: no schedule found within {_MAX_REPAIRS} repairs")

    admissible = functools.partial(_admissible, scenario=scenario)

    schedule, result, certified = _descend(schedule, result, lambda c: replay(c)[0], admissible, log)
    found = ReferenceResult(schedule, result, replays, certified, start_hours)
    better = improve_with_seeds(scenario, found, seeds, log)
    better.replays += replays
    return better


def improve_with_seeds(
    scenario: Scenario,
    found: ReferenceResult,
    seeds: Sequence[Schedule],
    log: Callable[[str], None] = lambda _: None,
) -> ReferenceResult:
    """`found`, or a cheaper schedule descended and certified from a seed that passes and keeps the
    bar (a seed is cut or extended to the reference's length). `replays` counts this call's only."""
    replays = 0

    def replay(schedule: Schedule) -> dict[str, object]:
        nonlocal replays
        replays += 1
        return run(scenario, ScheduleController("clairvoyant_cold_start", schedule), schedule[0])

    admissible = functools.partial(_admissible, scenario=scenario)

    best = found
    for seed in seeds:
        length = len(best.schedule)
        seed = list(seed)[:length] + [best.schedule[-1]] * max(length - len(seed), 0)
        if not admissible(seed):
            continue
        trial = replay(seed)
        if not _passes(trial) or float(trial["gpu_hours"]) >= float(best.result["gpu_hours"]):  # type: ignore[arg-type]
            continue
        log(f"a seed passes at {trial['gpu_hours']} GPU-h: descending from it")
        schedule, result, certified = _descend(seed, trial, replay, admissible, log)
        if float(result["gpu_hours"]) < float(best.result["gpu_hours"]):  # type: ignore[arg-type]
            best = ReferenceResult(schedule, result, 0, certified, found.start_gpu_hours)
    return dataclasses.replace(best, replays=replays)


def _descend(
    schedule: Schedule,
    result: dict[str, object],
    replay: Callable[[Schedule], dict[str, object]],
    admissible: Callable[[Schedule], bool],
    log: Callable[[str], None],
) -> tuple[Schedule, dict[str, object], int]:
    """Steps 3 and 4: lower runs, then single replica-minutes, while the replay passes; then certify
    that every admissible single removal fails. Returns the schedule, its line, the removals checked."""
    failed: list[Schedule] = []

    def try_moves(moves: list[Schedule]) -> bool:
        nonlocal schedule, result
        for candidate in moves:
            if not _cheaper_than_all_failed(candidate, failed):
                continue
            trial = replay(candidate)
            if _passes(trial):
                schedule, result = candidate, trial
                log(f"took a removal: {trial['gpu_hours']} GPU-h, {trial['slo_attainment']}")
                return True
            failed.append(candidate)
        return False

    # Whole runs first (many replica-minutes per replay), then single replica-minutes.
    while try_moves([c for c, _ in _run_lowerings(schedule) if admissible(c)]):
        pass
    while True:
        singles = [c for c, _ in _single_removals(schedule) if admissible(c)]
        if try_moves(singles):
            continue
        # Certificate: each admissible removal from the final schedule was replayed and failed.
        failed_set = {tuple(f) for f in failed}
        for candidate in singles:
            if tuple(candidate) not in failed_set:
                trial = replay(candidate)
                if _passes(trial):  # the replay is not monotone in capacity: take it, go on
                    schedule, result = candidate, trial
                    break
                failed.append(candidate)
        else:
            return schedule, result, len(singles)


def _admissible(candidate: Schedule, scenario: Scenario) -> bool:
    """Every role at or above its minimum and within the reversal bar."""
    return all(
        min(counts) >= scenario.min_replicas and _within_bar(counts)
        for counts in ([s[role] for s in candidate] for role in (0, 1))
    )


def _passes(result: dict[str, object]) -> bool:
    return float(result["slo_attainment"]) >= TARGET  # type: ignore[arg-type]


def _worst_miss(timeline: Timeline) -> tuple[int, int]:
    """(role, minute) with the most missed requests: TTFT misses count for prefill, ITL for decode."""
    misses: Counter[tuple[int, int]] = Counter()
    for arrival, ttft_ok, itl_ok in zip(timeline.arrivals, timeline.ttft_ok, timeline.itl_ok, strict=True):
        if not ttft_ok:
            misses[(0, int(arrival // MINUTE))] += 1
        elif not itl_ok:
            misses[(1, int(arrival // MINUTE))] += 1
    return misses.most_common(1)[0][0]


def _runs(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each maximal constant run."""
    out, start = [], 0
    for k in range(1, len(counts) + 1):
        if k == len(counts) or counts[k] != counts[start]:
            out.append((start, k))
            start = k
    return out


def _with_role(schedule: Schedule, role: int, counts: Sequence[int]) -> Schedule:
    return [(c, s[1]) if role == 0 else (s[0], c) for s, c in zip(schedule, counts, strict=True)]


def _raise_run(schedule: Schedule, role: int, minute: int, ceiling: int) -> Schedule:
    counts = [s[role] for s in schedule]
    for start, stop in _runs(counts):
        if start <= minute < stop:
            counts[start:stop] = [min(c + 1, ceiling) for c in counts[start:stop]]
    return _with_role(schedule, role, counts)


def _run_lowerings(schedule: Schedule) -> list[tuple[Schedule, int]]:
    """Each run of two minutes or more lowered by one replica, longest runs first."""
    moves = []
    for role in (0, 1):
        counts = [s[role] for s in schedule]
        for start, stop in _runs(counts):
            if stop - start >= 2:
                lowered = counts[:start] + [c - 1 for c in counts[start:stop]] + counts[stop:]
                moves.append((stop - start, _with_role(schedule, role, lowered), role))
    moves.sort(key=lambda m: -m[0])
    return [(s, role) for _, s, role in moves]


def _single_removals(schedule: Schedule) -> list[tuple[Schedule, int]]:
    """Each minute of each role with one replica fewer."""
    moves = []
    for role in (0, 1):
        counts = [s[role] for s in schedule]
        for k in range(len(counts)):
            lowered = counts.copy()
            lowered[k] -= 1
            moves.append((_with_role(schedule, role, lowered), role))
    return moves


def _cheaper_than_all_failed(candidate: Schedule, failed: list[Schedule]) -> bool:
    """False when the candidate holds no more than a schedule that already failed, minute by minute
    (less capacity everywhere cannot do better, to the replay's near-monotonicity)."""
    return not any(
        all(c[0] <= f[0] and c[1] <= f[1] for c, f in zip(candidate, bad, strict=True)) for bad in failed
    )
