"""NVIDIA Dynamo planner modes as replay baselines, modelled from Dynamo's own planner docs (v1.x).

Dynamo's planner (docs.nvidia.com/dynamo/v1.2.1/components/planner/planner-guide, "Scaling Modes")
has four `optimization_target`s: `throughput` (the default: static thresholds on queue depth and
KV-cache use), `latency` (the same with tighter thresholds), `load` (user-set prefill queued-token
and decode KV-use thresholds) and `sla` (a performance model; predictive throughput-based and/or
reactive load-based scaling). Modelled here, each with Dynamo's defaults:

- `dynamo_throughput`: the default target.
- `dynamo_load`: the `load` target.
- `dynamo_sla`: `sla` with only reactive load-based scaling on.
- `dynamo_sla_both` (optional): `sla` with both loops; the predictive one is the existing
  `SlaPlannerController` (docs/architecture/sla_planner.md formulas) every 180 s, used as a floor.

Where each default comes from (ai-dynamo/dynamo, files read at the commits named):
- `docs/components/planner/planner-config-reference.mdx` @08db9ac2: `optimization_target` =
  throughput; `load_adjustment_interval_seconds` = 5; `throughput_adjustment_interval_seconds` =
  180; `min_endpoint` = 1; `max_gpu_budget` = 8; `load_scaling_down_sensitivity` = 80;
  `ttft_ms` = 500, `itl_ms` = 50; the four `load` thresholds default to null and are required.
- `components/src/dynamo/planner/core/load_scaling.py` @0c6da1ec (same constants @936d8195):
  the `throughput` thresholds (prefill queued tokens / context_length: up at >= 1.0, down below
  0.1; decode (scheduled + queued KV) / max KV tokens: up above 1.0, down below 0.6); +-1 replica
  per decision; scale-up when ANY engine crosses, scale-down when ALL do and N > 1.
- `docs/design-docs/planner-design.md` @f9197486 ("Load-Based Scaling"): `sla` reactive scales up
  when ALL engines' estimated TTFT/ITL exceed the SLA, down when ALL are below SLA x sensitivity,
  +-1 per interval, blocking while a scaling operation is in progress; with both loops on, the
  throughput-based result is a lower bound under the load-based one.
- `load` thresholds: none are documented (the fields are required). We use the values Dynamo's
  planner sweep-configuration provider fills in when it picks `load` (prefill 1 / 0 queued tokens,
  decode 90% / 70% KV use), the one set Dynamo itself ships.

Dynamo's load loop decides every 5 s: `replay.run` replays a controller at its own `interval_seconds`
(at 30 s ticks the controllers still work, deciding every tick).

Deliberate departures: `max_gpu_budget` = 8 would cap a TP4 70B deployment at one prefill and one
decode replica, so every mode gets the scenario's replica bounds like the other baselines; and the
`sla` targets are the scenario's SLOs (a user sets `ttft_ms`/`itl_ms` to theirs).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from kvrelay_operator.autoscaler.types import Snapshot

from sim.cluster import FrontendStats
from sim.controllers import Controller, SlaPlannerController
from sim.model import ReplicaModel
from sim.replay import Scenario, run

DYNAMO_DOCS_VERSION = "v1.2.1"
# Llama-3.1-70B config.json max_position_embeddings: the engine's context_length Dynamo reads.
LLAMA31_CONTEXT_LENGTH = 131_072
# Dynamo keeps this many FPM observations for its moving averages (max_num_fpm_samples).
_MAX_SAMPLES = 64
_EPS = 1e-6


@dataclass(frozen=True)
class EngineView:
    """Per-engine signals Dynamo reads from ForwardPassMetrics, rebuilt from the sim's scrape.

    The sim has one shared queue per pool; Dynamo's router spreads requests over engines, so each
    engine is taken to hold an equal share (any engine crossing = all engines crossing).
    """

    ready: int
    queued_prefill_tokens: float
    kv_utilization: float
    decode_batch: float
    decode_waiting: float


class _LengthAverages:
    """Moving means of input and output lengths (Dynamo keeps them over its last FPM samples)."""

    def __init__(self) -> None:
        self.isl: deque[tuple[int, float]] = deque(maxlen=_MAX_SAMPLES)
        self.osl: deque[tuple[int, float]] = deque(maxlen=_MAX_SAMPLES)

    def observe(self, frontend: FrontendStats) -> None:
        if frontend.num_requests and frontend.mean_input_tokens is not None:
            self.isl.append((frontend.num_requests, frontend.mean_input_tokens))
        if frontend.mean_output_tokens is not None:
            self.osl.append((max(frontend.num_requests, 1), frontend.mean_output_tokens))

    @staticmethod
    def _mean(samples: deque[tuple[int, float]]) -> float | None:
        total = sum(n for n, _ in samples)
        return sum(n * v for n, v in samples) / total if total else None

    @property
    def mean_isl(self) -> float | None:
        return self._mean(self.isl)

    @property
    def mean_osl(self) -> float | None:
        return self._mean(self.osl)


class _DynamoLoadLoop:
    """Dynamo's reactive (load-based) loop: every interval, per role, +1, -1 or hold.

    A role whose replicas are still loading is not decided on (Dynamo blocks while a scaling
    operation is in progress: expected != ready); a replica told to go stops counting at once, so
    scale-downs are not blocked (the sim does not expose draining replicas). Signals are the gauges
    at the decision instant, as Dynamo reads each engine's latest forward-pass metrics. Counts are
    clamped to [min_r, max_r]; a role never goes below one ready engine by a scale-down.
    """

    name = "dynamo"

    def __init__(self, model: ReplicaModel, min_r: int, max_r: int, interval_seconds: float = 5.0) -> None:
        if not 1 <= min_r <= max_r:
            raise ValueError(f"need 1 <= min_r <= max_r, got min_r={min_r}, max_r={max_r}")
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be > 0, got {interval_seconds}")
        self.model = model
        self.min_r = min_r
        self.max_r = max_r
        self.interval_seconds = interval_seconds
        self.lengths = _LengthAverages()
        self._last_at: float | None = None

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """Desired (prefill, decode): the current counts unless this interval moves a role by one."""
        self.lengths.observe(frontend)
        held = (snapshot.prefill.current, snapshot.decode.current)
        due = self._last_at is None or now - self._last_at >= self.interval_seconds - _EPS
        if snapshot.metrics is None or not due:
            return held
        self._last_at = now
        view_p, view_d = self._views(snapshot)
        out = []
        for role, view, current in (("prefill", view_p, held[0]), ("decode", view_d, held[1])):
            pending = current - view.ready
            if pending > 0 or view.ready == 0:
                out.append(current)
                continue
            step = self._prefill_step(view) if role == "prefill" else self._decode_step(view)
            if step < 0 and view.ready <= 1:
                step = 0
            out.append(min(max(view.ready + step, self.min_r), self.max_r))
        return out[0], out[1]

    def _views(self, snapshot: Snapshot) -> tuple[EngineView, EngineView]:
        m = snapshot.metrics
        assert m is not None
        ready_p = snapshot.prefill.ready
        ready_d = snapshot.decode.ready
        queued = (m.queued_prefill_tokens or 0.0) / max(ready_p, 1)
        waiting = (m.decode_requests_waiting or 0.0) / max(ready_d, 1)
        running = (m.decode_requests_running or 0.0) / max(ready_d, 1)
        # Dynamo's decode utilization is (scheduled + queued decode KV) / max KV tokens. Scheduled:
        # the scraped KV-use gauge (the sim counts a sequence's prompt + output from admission, vLLM
        # the blocks held so far, so this reads up to osl/2 per sequence higher). Queued: requests
        # waiting for a decode slot, each bringing its prompt's KV (mean input length).
        queued_kv = waiting * (self.lengths.mean_isl or 0.0)
        util = (m.kv_cache_usage_ratio or 0.0) + queued_kv / self.model.kv_capacity_tokens
        view_p = EngineView(ready_p, queued, 0.0, 0.0, 0.0)
        view_d = EngineView(ready_d, 0.0, util, running, waiting)
        return view_p, view_d

    def _prefill_step(self, view: EngineView) -> int:
        raise NotImplementedError

    def _decode_step(self, view: EngineView) -> int:
        raise NotImplementedError


class DynamoThroughputController(_DynamoLoadLoop):
    """`optimization_target: throughput` (Dynamo's default): static queue and KV-use thresholds.

    Prefill: queued prompt tokens per engine / context_length; +1 at >= 1.0, -1 below 0.1.
    Decode: (scheduled + queued KV) / max KV tokens; +1 above 1.0, -1 below 0.6.
    """

    name = "dynamo_throughput"
    prefill_up = 1.0
    prefill_down = 0.1
    decode_up = 1.0
    decode_down = 0.6

    def __init__(
        self,
        model: ReplicaModel,
        min_r: int,
        max_r: int,
        interval_seconds: float = 5.0,
        context_length: int = LLAMA31_CONTEXT_LENGTH,
    ) -> None:
        super().__init__(model, min_r, max_r, interval_seconds)
        if context_length <= 0:
            raise ValueError(f"context_length must be > 0, got {context_length}")
        self.context_length = context_length

    def _prefill_step(self, view: EngineView) -> int:
        ratio = view.queued_prefill_tokens / self.context_length
        if ratio >= self.prefill_up:
            return 1
        return -1 if ratio < self.prefill_down else 0

    def _decode_step(self, view: EngineView) -> int:
        if view.kv_utilization > self.decode_up:
            return 1
        return -1 if view.kv_utilization < self.decode_down else 0


class DynamoLoadController(_DynamoLoadLoop):
    """`optimization_target: load`: user-set thresholds on prefill queued tokens and decode KV use.

    Prefill: +1 when queued tokens per engine >= up, -1 when <= down. Decode: +1 when KV use >=
    up %, -1 when <= down %. Defaults: Dynamo's sweep provider's (1 / 0 tokens, 90% / 70%).
    """

    name = "dynamo_load"

    def __init__(
        self,
        model: ReplicaModel,
        min_r: int,
        max_r: int,
        interval_seconds: float = 5.0,
        prefill_scale_up_queue_tokens: int = 1,
        prefill_scale_down_queue_tokens: int = 0,
        decode_scale_up_kv_rate: float = 90.0,
        decode_scale_down_kv_rate: float = 70.0,
    ) -> None:
        super().__init__(model, min_r, max_r, interval_seconds)
        if (
            prefill_scale_down_queue_tokens < 0
            or prefill_scale_up_queue_tokens <= prefill_scale_down_queue_tokens
        ):
            raise ValueError(
                "prefill_scale_up_queue_tokens must be > prefill_scale_down_queue_tokens >= 0, got "
                f"{prefill_scale_up_queue_tokens} and {prefill_scale_down_queue_tokens}"
            )
        if not 0 <= decode_scale_down_kv_rate < decode_scale_up_kv_rate <= 100:
            raise ValueError(
                "need 0 <= decode_scale_down_kv_rate < decode_scale_up_kv_rate <= 100 (percent), got "
                f"{decode_scale_down_kv_rate} and {decode_scale_up_kv_rate}"
            )
        self.prefill_up = prefill_scale_up_queue_tokens
        self.prefill_down = prefill_scale_down_queue_tokens
        self.decode_up = decode_scale_up_kv_rate / 100.0
        self.decode_down = decode_scale_down_kv_rate / 100.0

    def _prefill_step(self, view: EngineView) -> int:
        if view.queued_prefill_tokens >= self.prefill_up:
            return 1
        return -1 if view.queued_prefill_tokens <= self.prefill_down else 0

    def _decode_step(self, view: EngineView) -> int:
        if view.kv_utilization >= self.decode_up:
            return 1
        return -1 if view.kv_utilization <= self.decode_down else 0


class DynamoSlaReactiveController(_DynamoLoadLoop):
    """`optimization_target: sla` with load-based (reactive) scaling only.

    Each engine's next-request TTFT (its queued prompt tokens plus one mean-length prompt, run in
    batches of max_prefill_batch_tokens) and next-step ITL (its running and queued sequences plus
    one) are estimated from a performance model: here the simulator's own timing, a perfect model,
    as for `sla_planner` (Dynamo fits one online from forward-pass metrics or AIConfigurator).
    +1 when the estimate exceeds the SLO, -1 when it is below SLO x sensitivity (0.8).
    """

    name = "dynamo_sla"

    def __init__(
        self,
        model: ReplicaModel,
        min_r: int,
        max_r: int,
        ttft_slo_seconds: float = 0.5,
        itl_slo_seconds: float = 0.05,
        interval_seconds: float = 5.0,
        scale_down_sensitivity: float = 0.80,
    ) -> None:
        super().__init__(model, min_r, max_r, interval_seconds)
        if ttft_slo_seconds <= 0 or itl_slo_seconds <= 0:
            raise ValueError(f"SLOs must be > 0, got ttft={ttft_slo_seconds}, itl={itl_slo_seconds}")
        if not 0 <= scale_down_sensitivity <= 1:
            raise ValueError(f"scale_down_sensitivity must be in [0, 1], got {scale_down_sensitivity}")
        self.ttft_slo = ttft_slo_seconds
        self.itl_slo = itl_slo_seconds
        self.sensitivity = scale_down_sensitivity

    def estimated_ttft(self, view: EngineView) -> float | None:
        """Seconds until a new mean-length prompt on one engine has been prefilled."""
        isl = self.lengths.mean_isl
        if isl is None:
            return None
        per_token = self.model.prefill_seconds(max(round(isl), 1)) / max(isl, 1.0)
        tokens = view.queued_prefill_tokens + isl
        batches = math.ceil(tokens / self.model.max_prefill_batch_tokens)
        return batches * self.model.prefill_batch_overhead_seconds + tokens * per_token

    def estimated_itl(self, view: EngineView) -> float | None:
        """Seconds of the next decode step on one engine with its queued sequences and one more."""
        isl, osl = self.lengths.mean_isl, self.lengths.mean_osl
        if isl is None:
            return None
        batch = view.decode_batch + view.decode_waiting + 1
        context = batch * (isl + (osl or 0.0) / 2)
        return self.model.decode_step_seconds(max(round(batch), 1), round(context))

    def _step(self, estimate: float | None, slo: float) -> int:
        if estimate is None:
            return 0
        if estimate > slo:
            return 1
        return -1 if estimate < slo * self.sensitivity else 0

    def _prefill_step(self, view: EngineView) -> int:
        return self._step(self.estimated_ttft(view), self.ttft_slo)

    def _decode_step(self, view: EngineView) -> int:
        return self._step(self.estimated_itl(view), self.itl_slo)


class DynamoSlaCombinedController:
    """`sla` with both loops: the predictive SLA-planner formulas every 180 s set a floor, the
    reactive loop moves +-1 every 5 s above it (planner-design.md, "Co-existence").

    Frontend statistics are pooled over the 180 s the predictive step covers.
    """

    name = "dynamo_sla_both"

    def __init__(
        self,
        reactive: DynamoSlaReactiveController,
        predictive: SlaPlannerController,
        throughput_interval_seconds: float = 180.0,
    ) -> None:
        if throughput_interval_seconds <= reactive.interval_seconds:
            raise ValueError(
                "throughput_interval_seconds must exceed the load interval "
                f"({throughput_interval_seconds} <= {reactive.interval_seconds})"
            )
        self.reactive = reactive
        self.predictive = predictive
        self.interval_seconds = reactive.interval_seconds
        self.throughput_interval_seconds = throughput_interval_seconds
        self.floor = (reactive.min_r, reactive.min_r)
        self._pool: list[FrontendStats] = []
        self._last_throughput_at = 0.0

    def decide(self, snapshot: Snapshot, now: float, frontend: FrontendStats) -> tuple[int, int]:
        """Reactive step, lifted to the latest predictive floor."""
        self._pool.append(frontend)
        if now - self._last_throughput_at >= self.throughput_interval_seconds - _EPS:
            pooled = _pool_frontend(self._pool, now - self._last_throughput_at)
            self._pool, self._last_throughput_at = [], now
            self.floor = self.predictive.decide(snapshot, now, pooled)
        wanted = self.reactive.decide(snapshot, now, frontend)
        return max(wanted[0], self.floor[0]), max(wanted[1], self.floor[1])


def _pool_frontend(stats: list[FrontendStats], period: float) -> FrontendStats:
    """One window's frontend statistics from several shorter ones (request-weighted means)."""

    def mean(values: list[tuple[int, float | None]]) -> float | None:
        kept = [(n, v) for n, v in values if v is not None and n > 0]
        total = sum(n for n, _ in kept)
        return sum(n * v for n, v in kept) / total if total else None

    num = sum(s.num_requests for s in stats)
    return FrontendStats(
        num_requests=num,
        period_seconds=max(period, _EPS),
        mean_input_tokens=mean([(s.num_requests, s.mean_input_tokens) for s in stats]),
        mean_output_tokens=mean([(1, s.mean_output_tokens) for s in stats]),
        mean_ttft_seconds=mean([(1, s.mean_ttft_seconds) for s in stats]),
        mean_itl_seconds=mean([(1, s.mean_itl_seconds) for s in stats]),
    )


def dynamo_controllers(scenario: Scenario, with_combined: bool = False) -> dict[str, Controller]:
    """Dynamo's planner modes for one scenario, by policy name (replay each with `run_dynamo`)."""
    model, lo, hi = scenario.model, scenario.min_replicas, scenario.max_replicas
    slos = {"ttft_slo_seconds": scenario.ttft_slo_seconds, "itl_slo_seconds": scenario.itl_slo_seconds}
    out: dict[str, Controller] = {
        "dynamo_throughput": DynamoThroughputController(model, lo, hi),
        "dynamo_load": DynamoLoadController(model, lo, hi),
        "dynamo_sla": DynamoSlaReactiveController(model, lo, hi, **slos),
    }
    if with_combined:
        predictive = SlaPlannerController(model, scenario.ttft_slo_seconds, scenario.itl_slo_seconds, lo, hi)
        out["dynamo_sla_both"] = DynamoSlaCombinedController(
            DynamoSlaReactiveController(model, lo, hi, **slos), predictive
        )
    return out


def run_dynamo(scenario: Scenario, controller: Controller, initial: tuple[int, int]) -> dict[str, object]:
    """`replay.run` (on the controller's own decision interval: Dynamo's load loop runs every 5 s)."""
    return run(scenario, controller, initial)
