"""Scaling controllers compared in the replay: kvrelay's policy and the baselines.

Every controller sees the same `Snapshot` every interval and returns (prefill, decode) replicas.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from kvrelay_operator.autoscaler.early import CHECK_SECONDS, checks_between, decide_early, prefill_overrun
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.types import Decision, PolicyConfig, PolicyState, Snapshot

from sim.cluster import FrontendStats
from sim.model import ReplicaModel


class Controller(Protocol):
    """Anything that turns a snapshot into replica counts."""

    name: str

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """Desired (prefill, decode) replicas."""
        ...


class KvrelayController:
    """The real `policy.decide`, state threaded through like the operator does: a decision every
    interval, and early checks between them (`autoscaler/early.py`) as the operator's timer runs them."""

    name = "kvrelay"

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        # The replay calls back at this pace: the policy's interval, or the early checks' between them.
        interval = config.interval_seconds
        self.interval_seconds = CHECK_SECONDS if checks_between(interval) else interval
        self._next_decision = interval
        self.state = PolicyState()
        self.decisions: list[Decision] = []

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """Run the pure policy when a decision is due, or early on a prefill overrun (contract metrics
        only; `frontend` is unused)."""
        if now + 1e-6 >= self._next_decision:
            while self._next_decision <= now + 1e-6:
                self._next_decision += self.config.interval_seconds
            decision, self.state = decide(snapshot, self.state, self.config, now)
            self.decisions.append(decision)
            return decision.prefill.replicas, decision.decode.replicas
        unchanged = snapshot.prefill.current, snapshot.decode.current
        queued = snapshot.metrics.queued_prefill_tokens if snapshot.metrics else None
        if prefill_overrun(queued, snapshot.prefill, self.state, self.config) is None:
            return unchanged
        early = decide_early(snapshot, self.state, self.config, now)
        if early is None:
            return unchanged
        decision, self.state = early
        self.decisions.append(decision)
        return decision.prefill.replicas, decision.decode.replicas


class StaticController:
    """A fixed deployment (peak-sized, or the best P:D split for the mean)."""

    def __init__(self, name: str, prefill: int, decode: int) -> None:
        self.name = name
        self.replicas = (prefill, decode)

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """Always the same counts."""
        return self.replicas


class SlaPlannerController:
    """Reimplementation of NVIDIA Dynamo's published SLA-planner formulas (docs/architecture/sla_planner.md).

    Constant load predictor (next interval = last interval); correction factors from the
    frontend's average TTFT and ITL over the ones its profile expects (here the simulator's own
    timing model: a perfect profile); prefill = ceil(load * min(1, p_corr) / thpt_per_gpu / gpus_per_engine),
    decode = ceil(req * osl / interval / thpt_per_gpu(itl / d_corr, isl + osl/2) / gpus_per_engine).
    It has no cooldowns and no N-1 check, as published.
    """

    name = "sla_planner"

    def __init__(self, model: ReplicaModel, ttft_slo: float, itl_slo: float, min_r: int, max_r: int) -> None:
        self.model = model
        self.ttft_slo = ttft_slo
        self.itl_slo = itl_slo
        self.min_r = min_r
        self.max_r = max_r
        self._osl = 1.0

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """One adjustment interval from the frontend's request count, mean ISL/OSL, TTFT and ITL."""
        m = snapshot.metrics
        current = (snapshot.prefill.current, snapshot.decode.current)
        if m is None or frontend.num_requests == 0 or frontend.mean_input_tokens is None:
            return current
        gpus = self.model.tensor_parallel
        interval = frontend.period_seconds
        isl = frontend.mean_input_tokens
        if frontend.mean_output_tokens is not None:
            self._osl = frontend.mean_output_tokens
        osl = self._osl
        # Prefill: expected TTFT is the profiled prefill time of an ISL-long prompt.
        p_corr = 1.0
        if frontend.mean_ttft_seconds:
            p_corr = frontend.mean_ttft_seconds / self.model.prefill_seconds(max(round(isl), 1))
        thpt_per_gpu_p = self.model.prefill_tokens_per_second(max(round(isl), 1)) / gpus
        load = frontend.num_requests * isl / interval * min(1.0, p_corr)
        prefill = math.ceil(load / thpt_per_gpu_p / gpus)
        # Decode: correction = observed ITL / ITL the profile predicts at the observed throughput.
        context = max(round(isl + osl / 2), 1)
        d_corr = 1.0
        ready_d = max(snapshot.decode.ready, 1)
        if frontend.mean_itl_seconds and m.generation_tokens_per_second:
            expected = self._itl_at_throughput(m.generation_tokens_per_second / ready_d, context)
            if expected:
                d_corr = frontend.mean_itl_seconds / expected
        corrected_itl = self.itl_slo / max(d_corr, 1e-3)
        thpt_per_gpu_d = self.model.decode_tokens_per_second_at_itl(corrected_itl, context) / gpus
        if thpt_per_gpu_d <= 0:
            decode = self.max_r
        else:
            decode = math.ceil(frontend.num_requests * osl / interval / thpt_per_gpu_d / gpus)
        return self._clamp(prefill), self._clamp(decode)

    def _itl_at_throughput(self, tokens_per_second: float, context: int) -> float | None:
        for batch in range(1, self.model.max_decode_batch + 1):
            step = self.model.decode_step_seconds(batch, batch * context)
            if batch / step >= tokens_per_second:
                return step
        return None

    def _clamp(self, value: int) -> int:
        return min(max(value, self.min_r), self.max_r)


class HpaController:
    """Kubernetes-HPA-style per-role threshold scaler on queue/utilization and KV-cache use.

    desired = ceil(ready * metric / target) outside a 10% tolerance; scale-up at most doubles;
    scale-down takes the highest recommendation of the last 300 s (HPA's stabilization window).
    Prefill metric: busy share of the prefill pool plus queued requests per replica; decode:
    KV-cache use and batch occupancy.
    """

    name = "hpa"

    def __init__(self, model: ReplicaModel, min_r: int, max_r: int, window_seconds: float = 300.0) -> None:
        self.model = model
        self.min_r = min_r
        self.max_r = max_r
        self.window = window_seconds
        self.history: dict[str, deque[tuple[float, int]]] = {"prefill": deque(), "decode": deque()}

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """Per-role threshold rule."""
        m = snapshot.metrics
        current = {"prefill": snapshot.prefill.current, "decode": snapshot.decode.current}
        if m is None:
            return current["prefill"], current["decode"]
        ready_p = max(snapshot.prefill.ready, 1)
        ready_d = max(snapshot.decode.ready, 1)
        busy = (m.prefill_busy_seconds_per_second or 0.0) / ready_p
        queue = (m.prefill_requests_waiting or 0.0) / ready_p
        ratio_p = max(busy / 0.7, queue / 4.0)
        occupancy = (m.decode_requests_running or 0.0) / (ready_d * self.model.max_decode_batch)
        waiting = (m.decode_requests_waiting or 0.0) / (ready_d * self.model.max_decode_batch)
        ratio_d = max((m.kv_cache_usage_ratio or 0.0) / 0.7, (occupancy + waiting) / 0.7)
        out = {}
        for role, ratio, ready in (("prefill", ratio_p, ready_p), ("decode", ratio_d, ready_d)):
            want = current[role] if abs(ratio - 1) <= 0.1 else math.ceil(ready * ratio)
            want = min(want, 2 * max(current[role], 1))
            hist = self.history[role]
            hist.append((now, want))
            while hist and hist[0][0] < now - self.window:
                hist.popleft()
            if want < current[role]:
                want = min(current[role], max(w for _, w in hist))
            out[role] = min(max(want, self.min_r), self.max_r)
        return out["prefill"], out["decode"]
