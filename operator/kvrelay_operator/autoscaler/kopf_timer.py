"""The autoscaler's I/O shell: a kopf timer around the pure `policy.decide`.

Every `autoscaling.intervalSeconds`, per DisaggregatedModel whose mode is auto or advisory: read
Prometheus (in a thread), take replica counts from status, decide, then publish (and every
`early.CHECK_SECONDS` between decisions, one gauge: a prefill queue already past the TTFT SLO is
decided on at once, `early.py`): always the
`kvrelay_autoscaler_*` metrics, the decision log and an Event when something changes; in status,
only when the decision changes something material or as a heartbeat (`heartbeat.should_write`):
`status.autoscaler` with the learned state, and in mode auto `status.<role>.desiredReplicas`,
which the reconciler applies (`handlers.on_model_event`): the operator stays the only writer of
child replicas. The policy's state lives in the per-object memo and, with every status write, in
`status.autoscaler.state`; an operator with no memo of the model (a restart, a new leader)
continues from that (`persist.restore`), so learned capacities, damping and cooldowns survive;
scale-down still waits for a fresh window of metrics after it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from kvrelay_operator import api, replicas
from kvrelay_operator.autoscaler import persist
from kvrelay_operator.autoscaler.decision_log import DecisionLog
from kvrelay_operator.autoscaler.early import CHECK_SECONDS, checks_between, decide_early, prefill_overrun
from kvrelay_operator.autoscaler.heartbeat import Written, should_write, summarize
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.prometheus import PrometheusReader, QuerySpec
from kvrelay_operator.autoscaler.types import (
    ROLES,
    Decision,
    MetricsSample,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    RoleReplicas,
    Snapshot,
    interval_windows,
)

log = logging.getLogger(__name__)

# The timer ticks this often; each object decides only when its own interval has passed
# (intervalSeconds may differ per object, kopf timers have one interval per handler).
TICK_SECONDS = 5.0
_MEMO_KEY = "autoscaler"

DESIRED_REPLICAS = Gauge(
    "kvrelay_autoscaler_desired_replicas", "Replicas the autoscaler decided per role.", ["model", "role"]
)
DECISIONS = Counter(
    "kvrelay_autoscaler_decisions",
    "Autoscaler decisions per role, by direction and reason code.",
    ["model", "role", "direction", "reason"],
)
DECISION_LOG = DecisionLog(
    Path(os.environ["KVRELAY_DECISION_LOG"]) if os.environ.get("KVRELAY_DECISION_LOG") else None
)


def served_model(spec: api.DisaggregatedModelSpec, name: str) -> str:
    """The `model` label the workers and router put on their series."""
    return spec.model.served_name or name


def policy_config(spec: api.DisaggregatedModelSpec) -> PolicyConfig:
    """PolicyConfig from `spec.autoscaling` plus per-role bounds and tensorParallel."""
    auto = spec.autoscaling
    defaults = PolicyConfig.model_fields
    return PolicyConfig(
        ttft_slo_seconds=auto.slo.ttft_seconds,
        itl_slo_seconds=auto.slo.itl_seconds,
        quantile=auto.slo.quantile,
        prefill=RoleLimits(
            min_replicas=spec.prefill.min_replicas,
            max_replicas=spec.prefill.max_replicas,
            gpus_per_replica=spec.prefill.tensor_parallel,
            capacity_basis=capacity_basis(spec, "prefill"),
        ),
        decode=RoleLimits(
            min_replicas=spec.decode.min_replicas,
            max_replicas=spec.decode.max_replicas,
            gpus_per_replica=spec.decode.tensor_parallel,
            capacity_basis=capacity_basis(spec, "decode"),
        ),
        ratio_min=auto.ratio.min,
        ratio_max=auto.ratio.max,
        gpu_budget=auto.gpu_budget,
        **interval_windows(float(auto.interval_seconds)),
        scale_up_cooldown_seconds=float(auto.scale_up_cooldown()),
        scale_down_cooldown_seconds=float(auto.scale_down_cooldown_seconds),
        prefill_tokens_per_second=auto.profile.prefill_tokens_per_second
        or defaults["prefill_tokens_per_second"].default,
        decode_tokens_per_second=auto.profile.decode_tokens_per_second
        or defaults["decode_tokens_per_second"].default,
    )


def capacity_basis(spec: api.DisaggregatedModelSpec, role: str) -> str:
    """Fingerprint of what one replica of `role` can serve: the checkpoint, dtype and context, the image,
    the role's tensorParallel, node pool, resources, batch limit and extra flags, and its profile seed.
    Replicas, bounds and SLOs are left out: they change what is asked of a replica, not what it does."""
    role_spec: api.WorkerRoleSpec = getattr(spec, role)
    profile = spec.autoscaling.profile
    basis = {
        "model": spec.model.model_dump(mode="json", include={"source", "revision", "dtype", "max_model_len"}),
        "image": spec.image,
        "role": role_spec.model_dump(
            mode="json", exclude={"replicas", "min_replicas", "max_replicas", "drain_seconds"}
        ),
        "seed": profile.prefill_tokens_per_second if role == "prefill" else profile.decode_tokens_per_second,
    }
    blob = json.dumps(basis, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def query_spec(spec: api.DisaggregatedModelSpec, name: str) -> QuerySpec:
    """Window: at least one decision interval and four scrapes (rate() needs two samples)."""
    scrape = _seconds(spec.monitoring.interval)
    window = max(float(spec.autoscaling.interval_seconds), 4.0 * scrape, 10.0)
    return QuerySpec(
        model=served_model(spec, name),
        window_seconds=math.ceil(window),
        quantile=spec.autoscaling.slo.quantile,
    )


def role_replicas(
    spec: api.DisaggregatedModelSpec, status: api.DisaggregatedModelStatus, role: str
) -> RoleReplicas:
    """Current = what the reconciler applies now; ready = ready pods it reported."""
    role_status: api.RoleStatus | None = getattr(status, role)
    current = replicas.target_replicas(spec, status, role)  # type: ignore[arg-type]
    ready = role_status.ready_replicas if role_status is not None else 0
    return RoleReplicas(current=current, ready=min(ready, current))


def decision_status_patch(
    decision: Decision, mode: str, when: str, note: str = "", state: PolicyState | None = None
) -> dict[str, Any]:
    """The status merge patch: the decision and the learned state, desiredReplicas only in mode auto."""
    reason = decision.reason + (f" ({note})" if note else "")
    patch: dict[str, Any] = {
        "autoscaler": {
            "lastDecisionTime": when,
            "prefillReplicas": decision.prefill.replicas,
            "decodeReplicas": decision.decode.replicas,
            "reason": reason[:1024],
            "inputs": {k: round(v, 6) for k, v in decision.inputs.items() if math.isfinite(v)},
        }
    }
    if state is not None:
        # Nulls included: a merge patch keeps whatever field it does not name.
        patch["autoscaler"]["state"] = persist.to_status(state).model_dump(by_alias=True, mode="json")
    if mode == "auto" and not decision.hold:
        for role in ROLES:
            patch[role] = {"desiredReplicas": decision.role(role).replicas}
    return patch


def decision_labels(model: str, decision: Decision) -> list[tuple[str, str, str, str]]:
    """decisions_total's (model, role, direction, reason) per role: the reason is the ReasonCode."""
    return [(model, role, decision.role(role).direction, decision.role(role).code.value) for role in ROLES]


def event_message(decision: Decision, mode: str) -> str:
    """One line for the Event: the change and why."""
    moves = ", ".join(
        f"{role} {decision.role(role).previous}->{decision.role(role).replicas}" for role in ROLES
    )
    prefix = "advised" if mode == "advisory" else "decided"
    return f"{prefix} {moves}: {decision.reason}"[:1024]


@dataclass
class _Runtime:
    """Per-object memory between ticks."""

    state: PolicyState | None = None  # None until read back from status on the first decision
    last_decision_at: float = -math.inf
    last_check_at: float = -math.inf  # the last read of Prometheus, a decision or an early check
    reader: PrometheusReader | None = None
    reader_key: tuple[str, QuerySpec] | None = None
    last_hold: bool | None = None
    written: Written | None = None  # what this process last wrote to status


def _prometheus_url(spec: api.DisaggregatedModelSpec, memo: kopf.Memo) -> str | None:
    if spec.autoscaling.prometheus_url:
        return spec.autoscaling.prometheus_url
    state = memo.get("kvrelay")
    configured = getattr(getattr(state, "config", None), "prometheus_url", None)
    return configured or os.environ.get("KVRELAY_PROMETHEUS_URL") or None


async def _read_queue(runtime: _Runtime, url: str | None, qspec: QuerySpec) -> float | None:
    """The queued prompt tokens alone (the early check), or None when they cannot be read."""
    if url is None:
        return None
    reader = _reader(runtime, url, qspec)
    try:
        return await asyncio.to_thread(reader.read_queued_prefill_tokens)
    except Exception:  # the next decision reads, and says, what is wrong
        return None


def _reader(runtime: _Runtime, url: str, qspec: QuerySpec) -> PrometheusReader:
    key = (url, qspec)
    if runtime.reader is None or runtime.reader_key != key:
        runtime.reader, runtime.reader_key = PrometheusReader(url, qspec), key
    return runtime.reader


async def _read_metrics(
    runtime: _Runtime, url: str | None, qspec: QuerySpec
) -> tuple[MetricsSample | None, str]:
    """The sample, or None and why (no URL, Prometheus unreachable, no series)."""
    if url is None:
        return None, "no Prometheus URL: set spec.autoscaling.prometheusUrl or --prometheus-url"
    reader = _reader(runtime, url, qspec)
    try:
        sample = await asyncio.to_thread(reader.read)
    except Exception as exc:  # network, HTTP and PromQL errors all mean "hold"
        return None, f"Prometheus query failed: {type(exc).__name__}: {exc}"[:300]
    return sample, "" if sample is not None else f"no worker series for model {qspec.model!r}"


@kopf.timer(
    api.GROUP,
    api.VERSION,
    api.PLURAL,
    interval=TICK_SECONDS,
    when=lambda spec, **_: (spec.get("autoscaling") or {}).get("mode", "off") in ("auto", "advisory"),
)
async def autoscale(
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str,
    body: kopf.Body,
    memo: kopf.Memo,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """One autoscaling step for one DisaggregatedModel (skipped until its interval has passed)."""
    raw_status, saved = _split_saved_state(status)
    try:
        parsed = api.DisaggregatedModelSpec.model_validate(dict(spec))
        parsed_status = api.DisaggregatedModelStatus.model_validate(raw_status)
    except ValidationError as exc:
        log.warning("%s/%s: autoscaler skips an invalid spec/status: %s", namespace, name, exc)
        return
    runtime: _Runtime = memo.setdefault(_MEMO_KEY, _Runtime())
    now = time.time()
    step = next_step(runtime, float(parsed.autoscaling.interval_seconds), now)
    if step is None:
        return
    config = policy_config(parsed)
    runtime.last_check_at = now
    if step == "decide":
        runtime.last_decision_at = now
    if runtime.state is None:
        runtime.state = _restored_state(saved, now, config, f"{namespace}/{name}")

    mode = parsed.autoscaling.mode
    url, qspec = _prometheus_url(parsed, memo), query_spec(parsed, name)
    prefill = role_replicas(parsed, parsed_status, "prefill")
    overrun = None
    if step == "check":
        # Between decisions: one gauge; the rest only for a prefill queue past the TTFT SLO (early.py).
        overrun = prefill_overrun(await _read_queue(runtime, url, qspec), prefill, runtime.state, config)
        if overrun is None:
            return
    metrics, note = await _read_metrics(runtime, url, qspec)
    snapshot = Snapshot(
        metrics=metrics, prefill=prefill, decode=role_replicas(parsed, parsed_status, "decode")
    )
    if overrun is not None:
        early = decide_early(snapshot, runtime.state, config, now)
        if early is None:
            return
        decision, runtime.state = early
        note = f"early: the prefill queue waits {overrun:.1f}s > TTFT SLO {config.ttft_slo_seconds:g}s"
    else:
        decision, runtime.state = decide(snapshot, runtime.state, config, now)
    DECISION_LOG.record(f"{namespace}/{name}", snapshot, decision)

    desired = {role: _desired_replicas(parsed_status, role) for role in ROLES}
    summary = summarize(decision, runtime.state, mode, desired)
    if should_write(runtime.written, summary):
        when = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for key, value in decision_status_patch(decision, mode, when, note, runtime.state).items():
            patch.status[key] = value
        runtime.written = summary
    model = served_model(parsed, name)
    for role in ROLES:
        DESIRED_REPLICAS.labels(model, role).set(decision.role(role).replicas)
    for labels in decision_labels(model, decision):
        DECISIONS.labels(*labels).inc()

    changed = any(decision.role(role).direction != "none" for role in ROLES)
    if changed or decision.hold != runtime.last_hold:
        kopf.event(
            body,
            type="Warning" if decision.hold else "Normal",
            reason="AutoscalerHold" if decision.hold else "AutoscalerDecision",
            message=event_message(decision, mode) + (f" ({note})" if note else ""),
        )
    runtime.last_hold = decision.hold


def next_step(runtime: _Runtime, interval_seconds: float, now: float) -> str | None:
    """What this tick does for one object: "decide" once its interval has passed, "check" for a
    prefill overrun every `early.CHECK_SECONDS` between decisions, or None."""
    if now - runtime.last_decision_at >= interval_seconds - 0.5:
        return "decide"
    if (
        runtime.state is not None
        and checks_between(interval_seconds)
        and now - runtime.last_check_at >= CHECK_SECONDS - 0.5
    ):
        return "check"
    return None


def _desired_replicas(status: api.DisaggregatedModelStatus, role: str) -> int | None:
    role_status: api.RoleStatus | None = getattr(status, role)
    return None if role_status is None else role_status.desired_replicas


def _split_saved_state(status: kopf.Status | None) -> tuple[dict[str, Any], Any]:
    """(status without autoscaler.state, that state as stored): a state this version cannot read
    must not stop the autoscaler, only its restore."""
    raw = dict(status or {})
    autoscaler = dict(raw.get("autoscaler") or {})
    saved = autoscaler.pop("state", None)
    if "autoscaler" in raw:
        raw["autoscaler"] = autoscaler
    return raw, saved


def _restored_state(saved: Any, now: float, config: PolicyConfig, obj: str) -> PolicyState:
    """What a process with no memory of `obj` continues from: status.autoscaler.state, else nothing."""
    if saved is None:
        return PolicyState()
    try:
        state = persist.restore(api.AutoscalerState.model_validate(saved), now, config)
    except ValidationError as exc:
        log.warning("%s: autoscaler starts afresh, its saved state is unreadable: %s", obj, exc)
        return PolicyState()
    capacity = {role: state.role(role).capacity_tokens_per_second for role in ROLES}
    log.info("%s: autoscaler continues from its saved state (learned capacity %s)", obj, capacity)
    return state


def _seconds(duration: str) -> float:
    """'15s', '500ms', '1m' -> seconds."""
    match = re.fullmatch(r"([0-9]+)(ms|s|m)", duration)
    if match is None:
        return 15.0
    value, unit = int(match.group(1)), match.group(2)
    return value / 1000.0 if unit == "ms" else value * (60.0 if unit == "m" else 1.0)
