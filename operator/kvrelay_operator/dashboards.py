"""Grafana dashboards as code: the four kvrelay dashboards, rendered to charts/kvrelay/dashboards/*.json.

The dashboards are plain data first (``DashboardSpec`` of rows of ``PanelSpec``), so tests can read every
panel's PromQL without Grafana; ``build_dashboard`` turns a spec into Grafana JSON with the foundation SDK.
Only the metric names of docs/wire-contracts.md section 4 are used.

Re-render after editing: ``python -m kvrelay_operator.dashboards`` (``--check`` exits 1 when stale).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import table as gtable
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dmodel
from grafana_foundation_sdk.models import prometheus as pmodel

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "charts" / "kvrelay" / "dashboards"
GRID_WIDTH = 24
PANEL_HEIGHT = 8

# Grafana variables referenced by the queries; ``expand_variables`` substitutes them for raw Prometheus.
MODEL = 'model=~"$model"'
RATE = "$__rate_interval"
# The router's series carry no worker role; workers' carry role=prefill|decode (wire contract section 4).
ROUTER = f'{MODEL}, role!~"prefill|decode"'

PanelKind = Literal["timeseries", "stat", "table"]


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel and its legend."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class PanelSpec:
    """A panel: title, what it shows, its queries, unit and width in grid columns."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: PanelKind = "timeseries"
    width: int = 12


@dataclass(frozen=True)
class DashboardSpec:
    """A dashboard: file name, uid, title, and rows of panels."""

    filename: str
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...]
    tags: tuple[str, ...] = field(default=("kvrelay",))
    # Event markers drawn on every time series panel (name, PromQL whose non-empty steps are events).
    annotations: tuple[tuple[str, str], ...] = ()

    def panels(self) -> list[PanelSpec]:
        """All panels of the dashboard, in order."""
        return [panel for _, panels in self.rows for panel in panels]


def quantile(q: str, metric: str, selector: str = MODEL, by: str = "le") -> str:
    """PromQL of a histogram quantile over the dashboard's rate interval."""
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


def latency_vs_slo(metric: str, slo_var: str, selector: str = MODEL) -> tuple[Query, ...]:
    """p50/p90/p99 of a latency histogram next to the SLO target variable."""
    return (
        Query(quantile("0.5", metric, selector), "p50"),
        Query(quantile("0.9", metric, selector), "p90"),
        Query(quantile("0.99", metric, selector), "p99"),
        Query(f"vector(${slo_var})", "SLO target"),
    )


# A marker whenever the autoscaler changed a role's desired replicas.
SCALING_ANNOTATION = (
    "Scaling",
    f"sum by (model, role) (changes(kvrelay_autoscaler_desired_replicas{{{MODEL}}}[2m])) > 0",
)


def overview() -> DashboardSpec:
    """Request rate, TTFT and ITL quantiles against the SLO, token throughput."""
    traffic = (
        PanelSpec(
            "Requests/s by status",
            "Router requests per second, split by final status.",
            (Query(f"sum by (status) (rate(kvrelay_requests_total{{{MODEL}}}[{RATE}]))", "{{status}}"),),
            unit="reqps",
        ),
        PanelSpec(
            "Tokens/s",
            "Prompt tokens read and tokens generated per second, as seen by the router.",
            (
                Query(f"sum(rate(kvrelay_prompt_tokens_total{{{ROUTER}}}[{RATE}]))", "prompt"),
                Query(f"sum(rate(kvrelay_generation_tokens_total{{{ROUTER}}}[{RATE}]))", "generated"),
            ),
        ),
    )
    latency = (
        PanelSpec(
            "Time to first token vs SLO",
            "TTFT quantiles measured at the router; the dashed target is the $ttft_slo variable.",
            latency_vs_slo("kvrelay_time_to_first_token_seconds", "ttft_slo", ROUTER),
            unit="s",
        ),
        PanelSpec(
            "Inter-token latency vs SLO",
            "ITL quantiles measured at the router; the target is the $itl_slo variable.",
            latency_vs_slo("kvrelay_inter_token_latency_seconds", "itl_slo", ROUTER),
            unit="s",
        ),
    )
    return DashboardSpec(
        "kvrelay-overview.json",
        "kvrelay-overview",
        "kvrelay / Overview",
        "Traffic, latency against the SLO and throughput of kvrelay models.",
        (("Traffic", traffic), ("Latency", latency)),
    )


def pools() -> DashboardSpec:
    """Replicas per role, P:D ratio, queues and KV-cache use of the worker pools."""
    ready = f"count by (role) (kvrelay_kv_cache_usage_ratio{{{MODEL}}})"
    size = (
        PanelSpec(
            "Desired vs ready replicas",
            "Replicas the autoscaler wants per role, and worker processes reporting metrics (ready).",
            (
                Query(f"sum by (role) (kvrelay_autoscaler_desired_replicas{{{MODEL}}})", "desired {{role}}"),
                Query(ready, "ready {{role}}"),
            ),
        ),
        PanelSpec(
            "Prefill : decode ratio",
            "Ready prefill workers per ready decode worker, and the ratio the autoscaler wants.",
            (
                Query(
                    f'count(kvrelay_kv_cache_usage_ratio{{{MODEL}, role="prefill"}})'
                    f' / count(kvrelay_kv_cache_usage_ratio{{{MODEL}, role="decode"}})',
                    "ready",
                ),
                Query(
                    f'sum(kvrelay_autoscaler_desired_replicas{{{MODEL}, role="prefill"}})'
                    f' / sum(kvrelay_autoscaler_desired_replicas{{{MODEL}, role="decode"}})',
                    "desired",
                ),
            ),
        ),
    )
    load = (
        PanelSpec(
            "Queued prefill tokens",
            "Prompt tokens waiting for prefill: the prefill pool's backlog.",
            (Query(f"sum by (role) (kvrelay_queued_prefill_tokens{{{MODEL}}})", "{{role}}"),),
        ),
        PanelSpec(
            "KV-cache use",
            "Fraction of KV blocks in use, mean and busiest worker per role.",
            (
                Query(f"avg by (role) (kvrelay_kv_cache_usage_ratio{{{MODEL}}})", "mean {{role}}"),
                Query(f"max by (role) (kvrelay_kv_cache_usage_ratio{{{MODEL}}})", "max {{role}}"),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "Running and waiting requests",
            "Requests in a batch and requests queued, per role.",
            (
                Query(f"sum by (role) (kvrelay_requests_running{{{MODEL}}})", "running {{role}}"),
                Query(f"sum by (role) (kvrelay_requests_waiting{{{MODEL}}})", "waiting {{role}}"),
            ),
        ),
        PanelSpec(
            "Queue time and prefill time (p90)",
            "How long requests wait in a worker queue, and how long one prefill takes.",
            (
                Query(quantile("0.9", "kvrelay_request_queue_seconds", by="le, role"), "queue {{role}}"),
                Query(quantile("0.9", "kvrelay_prefill_seconds"), "prefill"),
            ),
            unit="s",
        ),
    )
    # Rates over looked-up tokens; `> 0` drops a role that looked nothing up (0/0 is no answer, not NaN).
    hits = f"sum by (role) (rate(kvrelay_prefix_cache_hits_total{{{MODEL}}}[{RATE}]))"
    queries = f"sum by (role) (rate(kvrelay_prefix_cache_queries_total{{{MODEL}}}[{RATE}]))"
    routed_hits = f"sum(rate(kvrelay_router_prefix_hit_tokens_total{{{ROUTER}}}[{RATE}]))"
    routed_prompts = f"sum(rate(kvrelay_prompt_tokens_total{{{ROUTER}}}[{RATE}]))"
    prefix = (
        PanelSpec(
            "Prefix cache hit rate",
            "Share of looked-up prompt tokens whose KV a worker found in its prefix cache (not computed), "
            "per role, and the share the router expected when it chose the prefill worker.",
            (
                Query(f"{hits} / ({queries} > 0)", "{{role}}"),
                Query(f"{routed_hits} / ({routed_prompts} > 0)", "router estimate"),
            ),
            unit="percentunit",
            width=8,
        ),
        PanelSpec(
            "Cached blocks and evictions",
            "KV blocks held by the prefix cache (in use or free), and cached blocks evicted per second.",
            (
                Query(f"sum by (role) (kvrelay_prefix_cache_blocks{{{MODEL}}})", "cached {{role}}"),
                Query(
                    f"sum by (role) (rate(kvrelay_prefix_cache_evictions_total{{{MODEL}}}[{RATE}]))",
                    "evicted/s {{role}}",
                ),
            ),
            width=8,
        ),
        PanelSpec(
            "Routing decisions",
            "Why the router chose each worker: `prefix` (it likely held part of the prompt) or `load` "
            "(prefill: fewest queued tokens; decode: fewest running streams).",
            (
                Query(
                    f"sum by (reason) (rate(kvrelay_router_prefill_routing_total{{{ROUTER}}}[{RATE}]))",
                    "prefill {{reason}}",
                ),
                Query(
                    f"sum by (reason) (rate(kvrelay_router_decode_routing_total{{{ROUTER}}}[{RATE}]))",
                    "decode {{reason}}",
                ),
            ),
            unit="reqps",
            width=8,
        ),
    )
    return DashboardSpec(
        "kvrelay-pools.json",
        "kvrelay-pools",
        "kvrelay / Pools",
        "Prefill and decode pools: size, ratio, backlog, KV-cache pressure and prefix reuse.",
        (("Size", size), ("Load", load), ("Prefix cache", prefix)),
        annotations=(SCALING_ANNOTATION,),
    )


def kv_relay() -> DashboardSpec:
    """KV transfer latency, bandwidth, failures and blocks held for transfer."""
    transfer = (
        PanelSpec(
            "KV transfer latency",
            "Time to move one request's KV cache from a prefill to a decode worker.",
            (
                Query(quantile("0.5", "kvrelay_kv_transfer_seconds"), "p50"),
                Query(quantile("0.9", "kvrelay_kv_transfer_seconds"), "p90"),
                Query(quantile("0.99", "kvrelay_kv_transfer_seconds"), "p99"),
            ),
            unit="s",
        ),
        PanelSpec(
            "KV transfer bandwidth",
            "Bytes of KV cache relayed per second, by the role that counted them.",
            (Query(f"sum by (role) (rate(kvrelay_kv_transfer_bytes_total{{{MODEL}}}[{RATE}]))", "{{role}}"),),
            unit="Bps",
        ),
        PanelSpec(
            "KV transfers/s and failures by reason",
            "Completed transfers per second, and failed ones by reason (zero when none failed).",
            (
                Query(f"sum(rate(kvrelay_kv_transfer_seconds_count{{{MODEL}}}[{RATE}]))", "transfers"),
                # A labelled counter has no series before its first failure: show 0, not "No data".
                Query(
                    f"sum by (reason) (rate(kvrelay_kv_transfer_failures_total{{{MODEL}}}[{RATE}]))"
                    f' or label_replace(vector(0), "reason", "none", "", "")',
                    "failed {{reason}}",
                ),
            ),
            unit="ops",
        ),
        PanelSpec(
            "KV held for transfer",
            "Blocks and bytes a prefill worker holds until decode has pulled them (or the lease ends).",
            (
                Query(f"sum by (role) (kvrelay_kv_held_blocks{{{MODEL}}})", "blocks {{role}}"),
                Query(f"sum by (role) (kvrelay_kv_held_bytes{{{MODEL}}})", "bytes {{role}}"),
            ),
        ),
    )
    return DashboardSpec(
        "kvrelay-kv-relay.json",
        "kvrelay-kv-relay",
        "kvrelay / KV relay",
        "The prefill-to-decode KV-cache relay (NIXL or TCP).",
        (("Transfer", transfer),),
    )


def autoscaler() -> DashboardSpec:
    """The autoscaler's decisions with their reasons, and the inputs it decided from."""
    decisions = (
        PanelSpec(
            "Desired replicas",
            "Replicas per role the autoscaler asked for.",
            (Query(f"sum by (role) (kvrelay_autoscaler_desired_replicas{{{MODEL}}})", "{{role}}"),),
        ),
        PanelSpec(
            "Decisions by reason",
            "Each decision in the time range: role, direction and reason, with how many times it was made.",
            (
                Query(
                    "sum by (model, role, direction, reason) "
                    f"(increase(kvrelay_autoscaler_decisions_total{{{MODEL}}}[$__range]))",
                    instant=True,
                ),
            ),
            kind="table",
        ),
    )
    inputs = (
        PanelSpec(
            "TTFT: SLO vs observed",
            "The TTFT quantile the autoscaler compares to its SLO ($slo_quantile), and the target.",
            (
                Query(quantile("$slo_quantile", "kvrelay_time_to_first_token_seconds", ROUTER), "observed"),
                Query("vector($ttft_slo)", "SLO target"),
            ),
            unit="s",
            width=8,
        ),
        PanelSpec(
            "ITL: SLO vs observed",
            "The inter-token latency quantile the autoscaler compares to its SLO, and the target.",
            (
                Query(quantile("$slo_quantile", "kvrelay_inter_token_latency_seconds", ROUTER), "observed"),
                Query("vector($itl_slo)", "SLO target"),
            ),
            unit="s",
            width=8,
        ),
        PanelSpec(
            "Load inputs",
            "Generated tokens/s and queued prefill tokens: the load signals next to the latency ones.",
            (
                Query(
                    f"sum(rate(kvrelay_generation_tokens_total{{{ROUTER}}}[{RATE}]))", "generated tokens/s"
                ),
                Query(f"sum(kvrelay_queued_prefill_tokens{{{MODEL}}})", "queued prefill tokens"),
            ),
            width=8,
        ),
    )
    return DashboardSpec(
        "kvrelay-autoscaler.json",
        "kvrelay-autoscaler",
        "kvrelay / Autoscaler",
        "Why the autoscaler did what it did: decisions, reasons and the SLO against what was observed.",
        (("Decisions", decisions), ("Inputs", inputs)),
        annotations=(SCALING_ANNOTATION,),
    )


def dashboard_specs() -> list[DashboardSpec]:
    """The four kvrelay dashboards."""
    return [overview(), pools(), kv_relay(), autoscaler()]


# Defaults for the Grafana variables, also used by ``expand_variables`` for raw Prometheus queries.
VARIABLE_DEFAULTS: dict[str, str] = {"ttft_slo": "2", "itl_slo": "0.1", "slo_quantile": "0.9"}


def expand_variables(expr: str, model: str = ".*", rate_interval: str = "1m", range_: str = "5m") -> str:
    """Substitute the dashboard variables so a panel's PromQL runs against Prometheus directly."""
    values = {**VARIABLE_DEFAULTS, "model": model, "__rate_interval": rate_interval, "__range": range_}
    return re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), m.group(0)), expr)


def _datasource() -> dmodel.DataSourceRef:
    return dmodel.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _variables() -> list[object]:
    """Datasource, model (multi-select), and the SLO targets shown next to observed latency."""
    ds = gdash.DatasourceVariable("datasource").label("Data source").type("prometheus")
    model = (
        gdash.QueryVariable("model")
        .label("Model")
        .datasource(_datasource())
        .query("label_values(kvrelay_requests_total, model)")
        .refresh(dmodel.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    slos = []
    for name, label in (
        ("ttft_slo", "TTFT SLO (s)"),
        ("itl_slo", "ITL SLO (s)"),
        ("slo_quantile", "SLO quantile"),
    ):
        default = VARIABLE_DEFAULTS[name]
        slos.append(
            gdash.CustomVariable(name)
            .label(label)
            .values(default)
            .current(dmodel.VariableOption(selected=True, text=default, value=default))
            .allow_custom_value(True)
        )
    return [ds, model, *slos]


def _panel(spec: PanelSpec, panel_id: int) -> object:
    builder: gts.Panel | gstat.Panel | gtable.Panel
    builder = {"timeseries": gts.Panel, "stat": gstat.Panel, "table": gtable.Panel}[spec.kind]()
    builder = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(_datasource())
        .unit(spec.unit)
        .span(spec.width)
        .height(PANEL_HEIGHT)
    )
    for index, query in enumerate(spec.queries):
        target = gprom.Dataquery().expr(query.expr).ref_id(chr(ord("A") + index)).datasource(_datasource())
        target = target.legend_format(query.legend) if query.legend else target
        target = target.instant().format(pmodel.PromQueryFormat.TABLE) if query.instant else target.range()
        builder = builder.with_target(target)
    return builder


def build_dashboard(spec: DashboardSpec) -> dict[str, object]:
    """Grafana dashboard JSON (as a dict) for one spec."""
    builder = (
        gdash.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(list(spec.tags))
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dmodel.DashboardCursorSync.CROSSHAIR)
    )
    for variable in _variables():
        builder = builder.with_variable(variable)
    for name, expr in spec.annotations:
        builder = builder.annotation(
            gdash.AnnotationQuery()
            .name(name)
            .datasource(_datasource())
            .enable(True)
            .icon_color("orange")
            .expr(expr)
        )
    panel_id = 1
    for row_title, panels in spec.rows:
        builder = builder.with_row(gdash.Row(row_title).id(panel_id))
        panel_id += 1
        for panel in panels:
            builder = builder.with_panel(_panel(panel, panel_id))
            panel_id += 1
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def render_all() -> dict[str, str]:
    """File name -> JSON text (stable: sorted keys, trailing newline) of every dashboard."""
    return {
        spec.filename: json.dumps(build_dashboard(spec), indent=2, sort_keys=True) + "\n"
        for spec in dashboard_specs()
    }


def stale_files(out_dir: Path) -> list[str]:
    """Names of dashboard files in ``out_dir`` that differ from a fresh render (or are missing/extra)."""
    rendered = render_all()
    stale = [name for name, text in rendered.items() if _read(out_dir / name) != text]
    extra = [p.name for p in out_dir.glob("*.json") if p.name not in rendered] if out_dir.is_dir() else []
    return sorted(stale + extra)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards into the chart (or, with --check, report whether they are stale)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out_dir)
        for name in stale:
            print(
                f"stale: {args.out_dir / name} (run python -m kvrelay_operator.dashboards)", file=sys.stderr
            )
        return 1 if stale else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for stale_extra in set(p.name for p in args.out_dir.glob("*.json")) - set(render_all()):
        (args.out_dir / stale_extra).unlink()
    for name, text in render_all().items():
        (args.out_dir / name).write_text(text)
        print(args.out_dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
