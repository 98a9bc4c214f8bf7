"""Discrete-event model (simpy) of a disaggregated deployment: a prefill pool and a decode pool.

Request path: arrival -> (held at the router while a role has no ready replica: hold.py) -> shared
prefill queue -> a ready prefill replica batches prompts up to
`max_prefill_batch_tokens` -> KV relay (its time counts in TTFT, conservatively) -> shared decode
queue -> a decode replica admits it when batch and KV memory allow -> finishes after
`output_tokens - 1` decode steps. Replicas cost GPUs from allocation (cold start included) until
released; a removed replica drains its work first. A controller runs every interval on the same
virtual clock and sets the replica counts.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy
from kvrelay_operator.autoscaler.types import MetricsSample, RoleReplicas, Snapshot

from sim.hold import ROLES, HoldBounds, RouterHold
from sim.model import ReplicaModel

# Decode replicas advance this many steps per event (finishes fall exactly on chunk ends).
_DECODE_CHUNK_STEPS = 4
# The workers' scrape interval (`spec.monitoring.interval`'s default): a gauge read over the window is
# its samples, four of them in the 60 s window (`kopf_timer.query_spec` keeps at least four).
SCRAPE_SECONDS = 15.0


@dataclass(slots=True)
class SimRequest:
    """One request and the times the simulation gives it."""

    arrival: float
    prompt_tokens: int
    output_tokens: int
    first_token_at: float | None = None
    finished_at: float | None = None
    # scale to zero: held at the router because a role had no ready replica, then dispatched or refused
    waited_for_replicas: bool = False
    dispatched_at: float | None = None
    refused: str | None = None

    def ttft(self) -> float | None:
        """Time to first token (queue + prefill + KV relay)."""
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    def itl(self) -> float | None:
        """Mean inter-token latency after the first token (decode admission wait included)."""
        if self.finished_at is None or self.first_token_at is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.finished_at - self.first_token_at) / (self.output_tokens - 1)


@dataclass(slots=True)
class Replica:
    """One replica's life: GPUs held from `allocated_at` to `released_at`."""

    role: str
    allocated_at: float
    ready_at: float
    gpus: int
    draining: bool = False
    released_at: float | None = None
    serving: bool = False  # ready and not draining: the router routes to it
    # decode only
    heap: list[tuple[int, int, SimRequest]] = field(default_factory=list)
    steps: int = 0
    kv_used: int = 0
    context_base: int = 0
    start_step_sum: int = 0


class Cluster:
    """Both pools, their queues and the counters a Prometheus scrape would see."""

    def __init__(
        self,
        env: simpy.Environment,
        model: ReplicaModel,
        prefill: int,
        decode: int,
        hold: HoldBounds | None = None,
    ) -> None:
        self.env = env
        self.model = model
        # Ready replicas per role as the router sees them; a role at 0 makes new requests wait.
        self.num_serving = {"prefill": 0, "decode": 0}
        self.hold = RouterHold(env, hold or HoldBounds(), self.missing_roles, self._dispatch)  # type: ignore[arg-type]
        self.prefill_queue: deque[SimRequest] = deque()
        self.decode_queue: deque[SimRequest] = deque()
        self.replicas: dict[str, list[Replica]] = {"prefill": [], "decode": []}
        self.wakeup = {"prefill": env.event(), "decode": env.event()}
        self.queued_prefill_tokens = 0
        self.counters = {
            "requests": 0.0,
            "finished": 0.0,
            "prompt_tokens": 0.0,
            "generation_tokens": 0.0,
            "prefill_busy_seconds": 0.0,
            "kv_transfer_seconds": 0.0,
            "kv_transfers": 0.0,
        }
        self.ttft_log: list[tuple[float, float]] = []
        self.queue_log: list[tuple[float, float]] = []
        self.itl_log: list[tuple[float, float]] = []
        self.requests: list[SimRequest] = []
        self.done: list[SimRequest] = []
        self._seq = itertools.count()
        # Each ready decode replica's KV-cache use at every scrape: (time, replica, use).
        self.kv_scrapes: deque[tuple[float, int, float]] = deque()
        for role, num in (("prefill", prefill), ("decode", decode)):
            for _ in range(num):
                self._start(role, cold=False)
        env.process(self._scrape_kv_usage())

    # -- scaling ---------------------------------------------------------------------------
    def active(self, role: str) -> list[Replica]:
        """Replicas counted as `current`: not draining, not released."""
        return [r for r in self.replicas[role] if not r.draining and r.released_at is None]

    def role_replicas(self, role: str) -> RoleReplicas:
        """Current and ready counts as the kube API would report them."""
        active = self.active(role)
        ready = sum(1 for r in active if r.ready_at <= self.env.now)
        return RoleReplicas(current=len(active), ready=ready)

    def scale_to(self, role: str, num: int) -> None:
        """Add replicas (cold start) or drain the least useful ones (loading first)."""
        active = self.active(role)
        for _ in range(num - len(active)):
            self._start(role, cold=True)
        if num < len(active):
            now = self.env.now
            # Cancel the ones still loading first (newest first), then the least loaded.
            victims = sorted(active, key=lambda r: (r.ready_at <= now, len(r.heap), -r.ready_at))
            for replica in victims[: len(active) - num]:
                replica.draining = True
                if replica.serving:
                    replica.serving = False
                    self.num_serving[role] -= 1
                if replica.ready_at > now:
                    replica.released_at = now
            self._wake(role)
            self.hold.replicas_changed()

    def _start(self, role: str, cold: bool) -> None:
        now = self.env.now
        delay = self.model.cold_start_seconds if cold else 0.0
        replica = Replica(role, now, now + delay, self.model.tensor_parallel)
        self.replicas[role].append(replica)
        body = self._prefill_loop if role == "prefill" else self._decode_loop
        self.env.process(self._boot(replica, delay, body))

    def _boot(self, replica: Replica, delay: float, body: Callable[[Replica], object]):
        if delay:
            yield self.env.timeout(delay)
        if replica.released_at is None:
            if not replica.draining:
                replica.serving = True
                self.num_serving[replica.role] += 1
                self.hold.replicas_changed()
            yield from body(replica)  # type: ignore[misc]

    def missing_roles(self) -> list[str]:
        """Roles with no ready replica to route to (scaled to zero, or the only ones still loading)."""
        return [role for role in ROLES if not self.num_serving[role]]

    def _wake(self, role: str) -> None:
        event = self.wakeup[role]
        if not event.triggered:
            event.succeed()
        self.wakeup[role] = self.env.event()

    # -- load --------------------------------------------------------------------------------
    def arrivals(self, requests: list[tuple[float, int, int]]):
        """simpy process: open-loop arrivals on the trace's timestamps."""
        for at, prompt, output in requests:
            if at > self.env.now:
                yield self.env.timeout(at - self.env.now)
            request = SimRequest(at, prompt, output)
            self.requests.append(request)
            self.counters["requests"] += 1
            if self.num_serving["prefill"] and self.num_serving["decode"]:
                self._dispatch(request)
            else:
                self.hold.admit(request)  # type: ignore[arg-type]

    def _dispatch(self, request: SimRequest) -> None:
        """The router sends a request on to the prefill pool."""
        request.dispatched_at = self.env.now
        # Like the real prefill worker: prompt tokens count when a request is admitted.
        self.counters["prompt_tokens"] += request.prompt_tokens
        self.prefill_queue.append(request)
        self.queued_prefill_tokens += request.prompt_tokens
        self._wake("prefill")

    def _prefill_loop(self, replica: Replica):
        model = self.model
        while not replica.draining:
            if not self.prefill_queue:
                yield self.wakeup["prefill"]
                continue
            batch = [self.prefill_queue.popleft()]
            tokens = batch[0].prompt_tokens
            while (
                self.prefill_queue
                and tokens + self.prefill_queue[0].prompt_tokens <= model.max_prefill_batch_tokens
            ):
                batch.append(self.prefill_queue.popleft())
                tokens += batch[-1].prompt_tokens
            self.queued_prefill_tokens -= tokens
            seconds = model.prefill_batch_overhead_seconds + sum(
                model.prefill_seconds(r.prompt_tokens) for r in batch
            )
            yield self.env.timeout(seconds)
            now = self.env.now
            self.counters["prefill_busy_seconds"] += seconds
            for request in batch:
                transfer = model.kv_transfer_seconds(request.prompt_tokens)
                self.counters["kv_transfer_seconds"] += transfer
                self.counters["kv_transfers"] += 1
                request.first_token_at = now + transfer
                self.queue_log.append((now, now - seconds - request.dispatched_at))
                self.ttft_log.append((now, request.first_token_at - request.arrival))
                if request.output_tokens <= 1:
                    request.finished_at = request.first_token_at
                    self.done.append(request)
                    self.counters["finished"] += 1
                else:
                    self.decode_queue.append(request)
            self._wake("decode")
        replica.released_at = self.env.now

    def _decode_loop(self, replica: Replica):
        model = self.model
        capacity = model.kv_capacity_tokens
        while True:
            now = self.env.now
            while (
                not replica.draining
                and self.decode_queue
                and len(replica.heap) < model.max_decode_batch
                and self.decode_queue[0].first_token_at <= now  # type: ignore[operator]
                and replica.kv_used + self.decode_queue[0].prompt_tokens + self.decode_queue[0].output_tokens
                <= capacity
            ):
                request = self.decode_queue.popleft()
                # Finish step = start step + tokens still to make; O(1) context bookkeeping.
                heapq.heappush(
                    replica.heap, (replica.steps + request.output_tokens - 1, next(self._seq), request)
                )
                replica.kv_used += request.prompt_tokens + request.output_tokens
                replica.context_base += request.prompt_tokens + 1
                replica.start_step_sum += replica.steps
            if not replica.heap:
                if replica.draining:
                    break
                if self.decode_queue and self.decode_queue[0].first_token_at > now:  # type: ignore[operator]
                    yield self.env.timeout(self.decode_queue[0].first_token_at - now)  # type: ignore[operator]
                else:
                    yield self.wakeup["decode"]
                continue
            batch = len(replica.heap)
            # Engines admit new sequences every step: step one at a time while some wait.
            chunk_cap = 1 if self.decode_queue else _DECODE_CHUNK_STEPS
            chunk = min(chunk_cap, replica.heap[0][0] - replica.steps)
            context = replica.context_base + batch * replica.steps - replica.start_step_sum
            step = model.decode_step_seconds(batch, context)
            chunk = yield from self._run_steps(chunk, step)
            replica.steps += chunk
            self.counters["generation_tokens"] += chunk * batch
            now = self.env.now
            while replica.heap and replica.heap[0][0] <= replica.steps:
                _, _, request = heapq.heappop(replica.heap)
                request.finished_at = now
                self.done.append(request)
                self.counters["finished"] += 1
                replica.kv_used -= request.prompt_tokens + request.output_tokens
                replica.context_base -= request.prompt_tokens + 1
                replica.start_step_sum -= replica.steps - (request.output_tokens - 1)
                self.itl_log.append((now, request.itl() or 0.0))
        replica.released_at = self.env.now

    def _run_steps(self, chunk: int, step: float):
        """Run up to `chunk` decode steps; a request reaching decode mid-chunk ends it at the next
        step boundary (so it waits at most one step, as in an engine that admits every step).

        Returns the number of steps run.
        """
        started = self.env.now
        timer = self.env.timeout(chunk * step)
        if chunk > 1:
            yield timer | self.wakeup["decode"]
        else:
            yield timer
        if timer.processed or self.env.now - started >= chunk * step:
            return chunk
        # Woken mid-chunk: finish the step in flight.
        done = min(max(math.ceil((self.env.now - started) / step - 1e-9), 1), chunk)
        boundary = started + done * step
        if boundary > self.env.now:
            yield self.env.timeout(boundary - self.env.now)
        return done

    # -- observation --------------------------------------------------------------------------
    def kv_usage(self) -> float | None:
        """Mean KV-cache use of ready decode replicas."""
        now = self.env.now
        ready = [r for r in self.active("decode") if r.ready_at <= now]
        if not ready:
            return None
        return sum(r.kv_used for r in ready) / (len(ready) * self.model.kv_capacity_tokens)

    def _scrape_kv_usage(self):
        """Prometheus scrapes each decode worker's KV-cache gauge every `SCRAPE_SECONDS`."""
        while True:
            now = self.env.now
            for r in self.active("decode"):
                if r.ready_at <= now:
                    self.kv_scrapes.append((now, id(r), r.kv_used / self.model.kv_capacity_tokens))
            yield self.env.timeout(SCRAPE_SECONDS)

    def kv_usage_over(self, since: float) -> tuple[float | None, float | None]:
        """Each decode replica's mean and highest KV-cache use scraped after `since`, averaged over
        replicas (`avg(avg_over_time(..))`, `avg(max_over_time(..))`); older scrapes are dropped."""
        while self.kv_scrapes and self.kv_scrapes[0][0] <= since:
            self.kv_scrapes.popleft()
        per_replica: dict[int, list[float]] = {}
        for _, replica, use in self.kv_scrapes:
            per_replica.setdefault(replica, []).append(use)
        if not per_replica:
            return None, None
        means = [sum(uses) / len(uses) for uses in per_replica.values()]
        peaks = [max(uses) for uses in per_replica.values()]
        return sum(means) / len(means), sum(peaks) / len(peaks)

    def exported(self, role: str, since: float) -> bool:
        """Whether a replica of `role` was up to export its series (ready, not yet gone) at some time
        from `since` until now: a pool at zero exports nothing, and Prometheus answers no series."""
        now = self.env.now
        for r in self.replicas[role]:
            gone = now if r.released_at is None else r.released_at
            if r.ready_at <= gone and gone >= since:  # a start cancelled while loading never served
                return True
        return False

    def gpu_seconds(self, until: float) -> float:
        """GPU-seconds held by every replica, allocation to release (or `until`)."""
        total = 0.0
        for replicas in self.replicas.values():
            for r in replicas:
                end = min(r.released_at if r.released_at is not None else until, until)
                total += max(end - r.allocated_at, 0.0) * r.gpus
        return total


@dataclass(frozen=True)
class FrontendStats:
    """Per-window request statistics a frontend like Dynamo's exports (used by the SLA planner)."""

    num_requests: int
    period_seconds: float
    mean_input_tokens: float | None
    mean_output_tokens: float | None
    mean_ttft_seconds: float | None = None
    mean_itl_seconds: float | None = None


class Scraper:
    """Turns the cluster's counters into the `MetricsSample` the Prometheus reader would build."""

    def __init__(self, cluster: Cluster, quantile: float, window_seconds: float = 60.0) -> None:
        self.cluster = cluster
        self.quantile = quantile
        # Like rate(x[60s]) and histogram_quantile over 60 s: a sliding window, not the interval.
        self.window_seconds = window_seconds
        self._history: deque[tuple[float, dict[str, float], int, int, int]] = deque(
            [(cluster.env.now, dict(cluster.counters), 0, 0, 0)]
        )
        self._request_index = 0
        self._done_index = 0
        self.frontend = FrontendStats(0, 1.0, None, None)
        self._frontend_at = cluster.env.now

    def snapshot(self) -> Snapshot:
        """Rates and quantiles over the sliding window, gauges now; frontend stats since last call."""
        cluster = self.cluster
        now = cluster.env.now
        while len(self._history) > 1 and self._history[1][0] <= now - self.window_seconds:
            self._history.popleft()
        since, counters, ttft_index, itl_index, queue_index = self._history[0]
        window = max(now - since, 1e-9)
        rate = {k: (v - counters[k]) / window for k, v in cluster.counters.items()}
        ttfts = [v for _, v in cluster.ttft_log[ttft_index:]]
        itls = [v for _, v in cluster.itl_log[itl_index:]]
        queues = [v for _, v in cluster.queue_log[queue_index:]]
        self._history.append(
            (now, dict(cluster.counters), len(cluster.ttft_log), len(cluster.itl_log), len(cluster.queue_log))
        )
        arrived = cluster.requests[self._request_index :]
        self._request_index = len(cluster.requests)
        done = cluster.done[self._done_index :]
        self._done_index = len(cluster.done)
        self._frontend_at, previous_at = now, self._frontend_at
        self.frontend = FrontendStats(
            num_requests=len(arrived),
            period_seconds=max(now - previous_at, 1e-9),
            mean_input_tokens=sum(r.prompt_tokens for r in arrived) / len(arrived) if arrived else None,
            mean_output_tokens=sum(r.output_tokens for r in done) / len(done) if done else None,
            mean_ttft_seconds=sum(ttfts) / len(ttfts) if ttfts else None,
            mean_itl_seconds=sum(itls) / len(itls) if itls else None,
        )
        transfers = rate["kv_transfers"]
        # Worker series exist only while a worker exports them: rates while one did within the window,
        # gauges while one does now (prometheus.py; the policy reads a missing rate of a role with no
        # ready replica as 0). The router's series are always there, so the sample stays fresh.
        rates_p = cluster.exported("prefill", since)
        rates_d = cluster.exported("decode", since)
        gauges_p = cluster.exported("prefill", now)
        gauges_d = cluster.exported("decode", now)
        held = {role: cluster.hold.gauges[role].max_over(now - self.window_seconds) for role in ROLES}
        kv_mean, kv_peak = cluster.kv_usage_over(now - self.window_seconds)
        metrics = MetricsSample(
            observed_at=now,
            window_seconds=window,
            ttft_seconds=_quantile(ttfts, self.quantile),
            itl_seconds=_quantile(itls, self.quantile),
            mean_itl_seconds=sum(itls) / len(itls) if itls else None,
            # The router's kvrelay_requests_total counts finished requests.
            request_rate=rate["finished"],
            prompt_tokens_per_second=rate["prompt_tokens"] if rates_p else None,
            generation_tokens_per_second=rate["generation_tokens"] if rates_d else None,
            queued_prefill_tokens=float(cluster.queued_prefill_tokens) if gauges_p else None,
            prefill_requests_waiting=float(len(cluster.prefill_queue)) if gauges_p else None,
            decode_requests_waiting=float(len(cluster.decode_queue)) if gauges_d else None,
            decode_requests_running=float(sum(len(r.heap) for r in cluster.active("decode")))
            if gauges_d
            else None,
            kv_cache_usage_ratio=cluster.kv_usage(),
            kv_cache_usage_mean_ratio=kv_mean,
            kv_cache_usage_peak_ratio=kv_peak,
            kv_transfer_seconds=rate["kv_transfer_seconds"] / transfers if transfers > 0 else None,
            prefill_busy_seconds_per_second=rate["prefill_busy_seconds"] if rates_p else None,
            prefill_queue_seconds=_quantile(queues, self.quantile) if rates_p else None,
            prefill_requests_waiting_for_replicas=held["prefill"],
            decode_requests_waiting_for_replicas=held["decode"],
        )
        return Snapshot(
            metrics=metrics, prefill=cluster.role_replicas("prefill"), decode=cluster.role_replicas("decode")
        )


def _quantile(values: list[float], q: float) -> float | None:
    if len(values) < 5:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]
