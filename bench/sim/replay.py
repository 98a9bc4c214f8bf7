"""Run one trace against one controller on the simulated cluster and score it."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import simpy
from kvrelay_operator.api import AutoscalingSpec
from kvrelay_operator.autoscaler.policy import decode_replicas_needed, prefill_replicas_needed
from kvrelay_operator.autoscaler.types import PolicyConfig, RoleLimits, interval_windows

from sim.cluster import Cluster, Scraper, SimRequest
from sim.controllers import Controller
from sim.hold import HoldBounds
from sim.model import ReplicaModel
from sim.traces import Trace

_DEFAULTS = AutoscalingSpec()  # what a DisaggregatedModel gets without autoscaling settings
_TAIL_SECONDS = 120.0
REVERSAL_WINDOW_SECONDS = 3600.0
_VIOLATION_BIN_SECONDS = 10.0
# A profile is measured at one generic point, not tuned to a trace (learning must fix the rest).
_PROFILE_PROMPT_TOKENS = 2048


@dataclass(frozen=True)
class Scenario:
    """A trace plus the SLOs and model it is judged against."""

    trace: Trace
    model: ReplicaModel
    ttft_slo_seconds: float
    itl_slo_seconds: float
    quantile: float = 0.99
    interval_seconds: float = 30.0
    min_replicas: int = 1
    max_replicas: int = 64
    real: bool = False  # a recorded trace (the bar applies), not a synthetic shape
    # The router's hold while a role has no ready replica (scale to zero).
    hold: HoldBounds = field(default_factory=HoldBounds)

    def policy_config(self) -> PolicyConfig:
        """kvrelay's config as a user would write it from a profile at one generic point."""
        model = self.model
        limits = RoleLimits(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            gpus_per_replica=model.tensor_parallel,
        )
        context = _PROFILE_PROMPT_TOKENS
        return PolicyConfig(
            ttft_slo_seconds=self.ttft_slo_seconds,
            itl_slo_seconds=self.itl_slo_seconds,
            quantile=self.quantile,
            prefill=limits,
            decode=limits,
            replica_startup_seconds=model.cold_start_seconds,
            # the CRD's defaults as the operator maps them (kopf_timer.policy_config)
            **interval_windows(float(_DEFAULTS.interval_seconds)),
            scale_up_cooldown_seconds=float(_DEFAULTS.scale_up_cooldown()),
            scale_down_cooldown_seconds=float(_DEFAULTS.scale_down_cooldown_seconds),
            prefill_tokens_per_second=model.prefill_tokens_per_second(_PROFILE_PROMPT_TOKENS),
            decode_tokens_per_second=max(
                model.decode_tokens_per_second_at_itl(self.itl_slo_seconds, context), 1.0
            ),
            decode_base_itl_fraction=min(model.decode_step_seconds(1, context) / self.itl_slo_seconds, 0.95),
            expected_kv_transfer_seconds=model.kv_transfer_seconds(_PROFILE_PROMPT_TOKENS),
        )


def static_sizes(scenario: Scenario, which: str) -> tuple[int, int]:
    """Replicas a static deployment needs for the trace's 1-minute peak or its mean load."""
    reqs = scenario.trace.requests
    model = scenario.model
    duration = max(scenario.trace.duration_seconds, 60.0)
    num_bins = math.ceil(duration / 60.0)
    prompt = [0.0] * num_bins
    gen = [0.0] * num_bins
    for at, p, o in reqs:
        prompt[min(int(at // 60), num_bins - 1)] += p / 60.0
        gen[min(int(at // 60), num_bins - 1)] += o / 60.0
    if which == "peak":
        demand_p, demand_d = max(prompt), max(gen)
    else:
        demand_p, demand_d = sum(prompt) / num_bins, sum(gen) / num_bins
    mean_prompt = sum(p for _, p, _ in reqs) / len(reqs)
    cap_p = sum(p for _, p, _ in reqs) / sum(model.prefill_seconds(p) for _, p, _ in reqs)
    mean_context = round(mean_prompt + sum(o for _, _, o in reqs) / len(reqs) / 2)
    cap_d = model.decode_tokens_per_second_at_itl(scenario.itl_slo_seconds, mean_context)
    cap_d = cap_d or model.max_decode_batch / model.decode_step_seconds(model.max_decode_batch, mean_context)
    config = scenario.policy_config()
    kv = model.kv_transfer_seconds(round(mean_prompt))
    num_p = prefill_replicas_needed(
        demand_p, cap_p, mean_prompt, kv, config, config.prefill_target_utilization
    )
    num_d = decode_replicas_needed(demand_d, cap_d, config.decode_target_utilization)
    return max(num_p, 1), max(num_d, 1)


def phase_sizes(scenario: Scenario, start: float, stop: float) -> tuple[int, int]:
    """(prefill, decode) `static_sizes` gives the requests arriving in [start, stop) at their peak."""
    reqs = [(at - start, p, o) for at, p, o in scenario.trace.requests if start <= at < stop]
    if not reqs:
        return scenario.min_replicas, scenario.min_replicas
    return static_sizes(dataclasses.replace(scenario, trace=Trace("phase", reqs)), "peak")


def minute_sizes(scenario: Scenario) -> list[tuple[int, int]]:
    """What each minute of the trace needs on its own (a clairvoyant policy with no cold start)."""
    minutes = math.ceil(scenario.trace.duration_seconds / 60.0)
    return [phase_sizes(scenario, 60.0 * k, 60.0 * (k + 1)) for k in range(minutes)]


def peak_of(sizes: list[tuple[int, int]]) -> int:
    """Replicas of a static deployment sized by the same formula for the busiest minute of each role."""
    return max(p for p, _ in sizes) + max(d for _, d in sizes)


def oracle_vs_peak(sizes: list[tuple[int, int]]) -> float:
    """Holding each minute's own need, relative to holding the peak throughout (same formula).

    About the least any policy that meets the SLOs can hold; clairvoyant, no cold start.
    """
    return sum(p + d for p, d in sizes) / (len(sizes) * peak_of(sizes))


def fewest_replica_minutes(needs: list[int], max_reversals: int) -> int:
    """Least replica-minutes of a count that covers every minute's need and reverses at most
    `max_reversals` times (a direction change between two scale events), by dynamic programming.

    A clairvoyant policy without cold start under the reversal bar can do no better.
    """
    levels = sorted(set(needs))
    # best[(level, last direction, reversals)] = replica-minutes so far
    best: dict[tuple[int, int, int], int] = {(lv, 0, 0): lv for lv in levels if lv >= needs[0]}
    for need in needs[1:]:
        step: dict[tuple[int, int, int], int] = {}
        for (level, direction, flips), cost in best.items():
            for new in levels:
                if new < need:
                    continue
                move = (new > level) - (new < level)
                turned = move != 0 and direction != 0 and move != direction
                key = (new, move or direction, flips + int(turned))
                if key[2] <= max_reversals and cost + new < step.get(key, math.inf):
                    step[key] = cost + new
        best = step
    return min(best.values())


def reversal_bound_vs_peak(sizes: list[tuple[int, int]], hours: float) -> float:
    """Least GPU-hours, relative to the peak (same formula), of any clairvoyant, cold-start-free
    policy that covers every minute's need with <= 2 reversals per role per hour."""
    allowed = math.floor(2 * hours + 1e-9)
    minutes = sum(fewest_replica_minutes([size[role] for size in sizes], allowed) for role in (0, 1))
    return minutes / (len(sizes) * peak_of(sizes))


def causal_step_bound(scenario: Scenario) -> float | None:
    """Least GPU-hours, relative to the peak (same formula), a causal policy needs to meet 99% on
    a step trace; None for traces without steps.

    Nothing before an up-step announces it and a replica takes a cold start to serve, far longer
    than the 1% of requests a step's surge may miss; so the next phase's capacity must already be
    held when the step comes, and a policy that does not read the clock holds it through the whole
    phase before (that phase looks the same throughout). Down-steps are free (released at once).
    """
    steps = scenario.trace.step_times
    if not steps:
        return None
    bounds = [0.0, *steps, scenario.trace.duration_seconds]
    needs = [sum(phase_sizes(scenario, a, b)) for a, b in itertools.pairwise(bounds)]
    held = [max(need, needs[k + 1]) if k + 1 < len(needs) else need for k, need in enumerate(needs)]
    replica_seconds = sum(h * (b - a) for h, (a, b) in zip(held, itertools.pairwise(bounds), strict=True))
    return replica_seconds / (max(needs) * scenario.trace.duration_seconds)


@dataclass
class Timeline:
    """What one policy did over a replay, for the pictures: replicas per role at each control step, and
    each request's arrival time and whether it met both SLOs."""

    times: list[float] = field(default_factory=list)
    replicas: dict[str, list[int]] = field(default_factory=lambda: {"prefill": [], "decode": []})
    arrivals: list[float] = field(default_factory=list)
    in_slo: list[bool] = field(default_factory=list)
    ttft_ok: list[bool] = field(default_factory=list)
    itl_ok: list[bool] = field(default_factory=list)
    # per request, for scale to zero: its TTFT (None: not served), whether it waited at the router for
    # a ready replica, and why it was refused (None: not refused)
    ttft: list[float | None] = field(default_factory=list)
    waited_for_replicas: list[bool] = field(default_factory=list)
    refused: list[str | None] = field(default_factory=list)


def run(
    scenario: Scenario, controller: Controller, initial: tuple[int, int], timeline: Timeline | None = None
) -> dict[str, object]:
    """Replay open-loop; return the figures of one JSON line (and fill ``timeline`` when given).

    The controller decides every ``scenario.interval_seconds``, or at its own ``interval_seconds``
    where it has one (kvrelay's policy, HPA's sync period, Dynamo's 5 s load loop)."""
    interval = getattr(controller, "interval_seconds", None) or scenario.interval_seconds
    env = simpy.Environment()
    cluster = Cluster(env, scenario.model, *initial, hold=scenario.hold)
    scraper = Scraper(cluster, scenario.quantile)
    end = scenario.trace.duration_seconds + _TAIL_SECONDS
    events: dict[str, list[tuple[float, int]]] = {"prefill": [], "decode": []}

    def record() -> None:
        if timeline is not None:
            timeline.times.append(env.now)
            for role in ("prefill", "decode"):
                timeline.replicas[role].append(len(cluster.active(role)))

    def control():
        record()
        while True:
            yield env.timeout(interval)
            snapshot = scraper.snapshot()
            wanted = controller.decide(snapshot, env.now, scraper.frontend)
            for role, num in zip(("prefill", "decode"), wanted, strict=True):
                have = len(cluster.active(role))
                if num != have:
                    events[role].append((env.now, 1 if num > have else -1))
                    cluster.scale_to(role, num)
            record()

    env.process(cluster.arrivals(scenario.trace.requests))
    env.process(control())
    env.run(until=end)
    if timeline is not None:
        timeline.arrivals = [r.arrival for r in cluster.requests]
        timeline.in_slo = [_meets(r, scenario) for r in cluster.requests]
        timeline.ttft_ok = [
            (t := r.ttft()) is not None and t <= scenario.ttft_slo_seconds for r in cluster.requests
        ]
        timeline.itl_ok = [
            (t := r.itl()) is not None and t <= scenario.itl_slo_seconds for r in cluster.requests
        ]
        timeline.ttft = [r.ttft() for r in cluster.requests]
        timeline.waited_for_replicas = [r.waited_for_replicas for r in cluster.requests]
        timeline.refused = [r.refused for r in cluster.requests]
    return _score(scenario, controller.name, cluster, events, end)


def reversal_times(events: list[tuple[float, int]]) -> list[float]:
    """Times of the scale events that go against the one before them."""
    return [b[0] for a, b in itertools.pairwise(events) if a[1] != b[1]]


def max_in_window(times: list[float], window: float) -> int:
    """Most of `times` inside any window of `window` seconds (the bar's "per hour", held over every
    hour of the run rather than averaged: a rate over a 58-minute trace would count two reversals
    as 2.07 per hour, and one over a long trace would hide a flapping hour among calm ones)."""
    return max((sum(1 for t in times if start <= t < start + window) for start in times), default=0)


def _meets(req: SimRequest, scenario: Scenario) -> bool:
    ttft, itl = req.ttft(), req.itl()
    return (
        ttft is not None
        and itl is not None
        and ttft <= scenario.ttft_slo_seconds
        and itl <= scenario.itl_slo_seconds
    )


def _score(
    scenario: Scenario, name: str, cluster: Cluster, events: dict[str, list[tuple[float, int]]], end: float
) -> dict[str, object]:
    reqs = cluster.requests
    ok = [_meets(r, scenario) for r in reqs]
    ttft_ok = sum(1 for r in reqs if (t := r.ttft()) is not None and t <= scenario.ttft_slo_seconds)
    itl_ok = sum(1 for r in reqs if (t := r.itl()) is not None and t <= scenario.itl_slo_seconds)
    hours = scenario.trace.duration_seconds / 3600.0
    out: dict[str, object] = {
        "bench": "autoscaler_replay",
        "trace": scenario.trace.name,
        "policy": name,
        "requests": len(reqs),
        "slo_attainment": round(sum(ok) / max(len(reqs), 1), 5),
        "ttft_attainment": round(ttft_ok / max(len(reqs), 1), 5),
        "itl_attainment": round(itl_ok / max(len(reqs), 1), 5),
        "gpu_hours": round(cluster.gpu_seconds(end) / 3600.0, 3),
    }
    for role in ("prefill", "decode"):
        signs = [s for _, s in events[role]]
        turns = reversal_times(events[role])
        out[f"{role}_scale_events_per_hour"] = round(len(signs) / hours, 2)
        out[f"{role}_reversals_per_hour"] = round(len(turns) / hours, 2)
        out[f"{role}_max_reversals_in_an_hour"] = max_in_window(turns, REVERSAL_WINDOW_SECONDS)
    out["violation_seconds_after_steps"] = _violation_after_steps(scenario, reqs, ok)
    return out


def _violation_after_steps(scenario: Scenario, reqs: list[SimRequest], ok: list[bool]) -> list[float]:
    """Per load step: seconds of 10 s arrival bins, until the next step, under 99% attainment."""
    steps = scenario.trace.step_times
    if not steps:
        return []
    bins: dict[int, list[bool]] = {}
    for req, good in zip(reqs, ok, strict=True):
        bins.setdefault(int(req.arrival // _VIOLATION_BIN_SECONDS), []).append(good)
    bounds = [*steps, scenario.trace.duration_seconds]
    out = []
    for start, stop in itertools.pairwise(bounds):
        bad = 0
        for index in range(int(start // _VIOLATION_BIN_SECONDS), int(stop // _VIOLATION_BIN_SECONDS) + 1):
            results = bins.get(index)
            if results and sum(results) / len(results) < 0.99:
                bad += 1
        out.append(bad * _VIOLATION_BIN_SECONDS)
    return out
