"""What reacting costs: a causal policy with perfect knowledge of the past, against the
clairvoyant-with-cold-start reference.

The reference asks for each replica one cold start before the load needs it. A causal policy
cannot: it learns what a minute needed once that minute is over, and a replica it asks for then
serves a cold start later. This module builds the best a policy could do from that position with
perfect information about the past: at the start of minute m it knows the exact load of every
minute before m `lag` (1: the minute just ended, as if measured instantly), sized by the formula
the reference's search starts from (`replay.minute_sizes`); it keeps the most of the last `hold`
known minutes, times a margin per role, and its scale-downs spend the same reversal budget
kvrelay's policy does (a turn down only while the hour has room for it and for the turn up that may
follow). `search_reactive` finds the cheapest member that replays at >= 99% (the margins absorb the
formula's error). Lag 0 is not causal: it knows the minute that is starting, a minute of foresight.
The ratio to the reference is the price of reacting instead of forecasting, for this family; a
policy that forecasts (or reads the clock) is not bounded by it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from sim.reference import MINUTE, REVERSALS_PER_HOUR, TAIL_MINUTES, TARGET, Schedule, ScheduleController
from sim.replay import REVERSAL_WINDOW_SECONDS, Scenario, minute_sizes, run

NAME = "reactive_oracle"
# Lag 1 knows the minute just ended (causal, instant measurement); lag 0 also the one starting.
LAGS = (1, 0)
HOLDS = (1, 3, 8)
MARGINS = tuple(round(0.8 + 0.05 * k, 2) for k in range(25))  # 0.80 .. 2.00


@dataclasses.dataclass(frozen=True)
class ReactiveParams:
    """One member of the family: how late it sees the need, how long it keeps it, its margins."""

    lag: int
    hold: int
    prefill_margin: float
    decode_margin: float


def role_counts(
    need: Sequence[int], head: int, lag: int, hold: int, margin: float, floor: int, ceiling: int
) -> list[int]:
    """Per-minute replicas of one role: `head` until a need is known, then the margin over the
    most the last `hold` known minutes (those before m - lag + 1) needed, with scale-downs paced by
    the reversal budget."""
    wanted = []
    for m in range(len(need)):
        known = need[max(0, m - lag - hold + 1) : max(0, m - lag + 1)]
        target = head if not known else math.ceil(margin * max(known) - 1e-9)
        wanted.append(min(max(target, floor), ceiling))
    counts = [wanted[0]]
    turns: list[float] = []
    direction = 0
    for m, target in enumerate(wanted[1:], 1):
        last = counts[-1]
        move = (target > last) - (target < last)
        if move == 0:
            counts.append(last)
            continue
        turned = direction != 0 and move != direction
        recent = [t for t in turns if t > MINUTE * m - REVERSAL_WINDOW_SECONDS]
        # A turn down needs room for itself and the turn up that may follow it; ups always go.
        if turned and move < 0 and len(recent) + 2 > REVERSALS_PER_HOUR:
            counts.append(last)
            continue
        if turned:
            turns.append(MINUTE * m)
        direction = move
        counts.append(target)
    return counts


def minute_needs(scenario: Scenario) -> Schedule:
    """Each minute's (prefill, decode) need on its own, then the replay's tail at the minimum."""
    return minute_sizes(scenario) + [(scenario.min_replicas, scenario.min_replicas)] * TAIL_MINUTES


def reactive_schedule(
    needs: Schedule, initial: tuple[int, int], params: ReactiveParams, scenario: Scenario
) -> Schedule:
    """The family member's per-minute (prefill, decode) schedule."""
    roles = []
    for role, margin in ((0, params.prefill_margin), (1, params.decode_margin)):
        need = [s[role] for s in needs]
        roles.append(
            role_counts(
                need,
                initial[role],
                params.lag,
                params.hold,
                margin,
                scenario.min_replicas,
                scenario.max_replicas,
            )
        )
    return list(zip(roles[0], roles[1], strict=True))


@dataclasses.dataclass
class ReactiveResult:
    """The cheapest passing member for one lag (None: no member passes), with its replay line."""

    lag: int
    params: ReactiveParams | None
    result: dict[str, object] | None
    replays: int


def search_reactive(
    scenario: Scenario,
    needs: Schedule,
    initial: tuple[int, int],
    lag: int,
    log: Callable[[str], None] = lambda _: None,
) -> ReactiveResult:
    """Cheapest (hold, margins) at this lag that replays at >= 99%: for each hold, the least
    prefill margin that passes with decode generous, then the least decode margin beside it."""
    replays = 0
    cache: dict[ReactiveParams, dict[str, object]] = {}

    def replay(params: ReactiveParams) -> dict[str, object]:
        nonlocal replays
        if params not in cache:
            replays += 1
            schedule = reactive_schedule(needs, initial, params, scenario)
            cache[params] = run(scenario, ScheduleController(NAME, schedule), schedule[0])
        return cache[params]

    def passes(params: ReactiveParams) -> bool:
        return float(replay(params)["slo_attainment"]) >= TARGET  # type: ignore[arg-type]

    def least(margins: Sequence[float], make: Callable[[float], ReactiveParams]) -> float | None:
        """Least margin that passes, by bisection (capacity only grows with the margin)."""
        if not passes(make(margins[-1])):
            return None
        lo, hi = 0, len(margins) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if passes(make(margins[mid])):
                hi = mid
            else:
                lo = mid + 1
        return margins[lo]

    best: tuple[ReactiveParams, dict[str, object]] | None = None
    generous = MARGINS[-1]
    for hold in HOLDS:
        prefill = least(MARGINS, lambda m, h=hold: ReactiveParams(lag, h, m, generous))
        if prefill is None:
            log(f"lag {lag} hold {hold}: no prefill margin up to {generous} passes")
            continue
        decode = least(MARGINS, lambda m, h=hold, p=prefill: ReactiveParams(lag, h, p, m))
        if decode is None:  # decode tighter than generous never passed: keep the generous one
            decode = generous
        params = ReactiveParams(lag, hold, prefill, decode)
        line = replay(params)
        log(f"lag {lag} hold {hold}: margins {prefill}/{decode} -> {line['gpu_hours']} GPU-h")
        if float(line["slo_attainment"]) >= TARGET and (  # type: ignore[arg-type]
            best is None or float(line["gpu_hours"]) < float(best[1]["gpu_hours"])  # type: ignore[arg-type]
        ):
            best = (params, line)
    if best is None:
        return ReactiveResult(lag, None, None, replays)
    return ReactiveResult(lag, best[0], best[1], replays)
