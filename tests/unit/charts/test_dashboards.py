"""Dashboards as code: the committed JSON is fresh, and every query uses only contract metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kvrelay_operator import dashboards

ROOT = Path(__file__).resolve().parents[3]
CONTRACT = ROOT / "docs" / "wire-contracts.md"
CHART_DASHBOARDS = ROOT / "charts" / "kvrelay" / "dashboards"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def contract_metric_names() -> set[str]:
    """Metric names listed in section 4 of the wire contracts, with the kvrelay_ prefix."""
    text = CONTRACT.read_text()
    section = text.split("## 4. Metric names", 1)[1].split("\n## ", 1)[0]
    return {f"kvrelay_{name}" for name in re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", section)}


def test_committed_dashboards_are_fresh() -> None:
    stale = dashboards.stale_files(CHART_DASHBOARDS)
    assert stale == [], f"stale dashboards {stale}: run python -m kvrelay_operator.dashboards"


def test_stale_check_notices_an_edit(tmp_path: Path) -> None:
    assert dashboards.main(["--out-dir", str(tmp_path)]) == 0
    assert dashboards.stale_files(tmp_path) == []
    victim = tmp_path / "kvrelay-overview.json"
    victim.write_text(victim.read_text().replace("Overview", "Overwiew"))
    (tmp_path / "leftover.json").write_text("{}")
    assert dashboards.stale_files(tmp_path) == ["kvrelay-overview.json", "leftover.json"]
    assert dashboards.main(["--out-dir", str(tmp_path), "--check"]) == 1


def test_four_dashboards_with_unique_uids() -> None:
    rendered = {name: json.loads(text) for name, text in dashboards.render_all().items()}
    assert {d["title"] for d in rendered.values()} == {
        "kvrelay / Overview",
        "kvrelay / Pools",
        "kvrelay / KV relay",
        "kvrelay / Autoscaler",
    }
    assert len({d["uid"] for d in rendered.values()}) == 4
    for doc in rendered.values():
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)), f"duplicate panel ids in {doc['title']}"
        variables = {v["name"] for v in doc["templating"]["list"]}
        assert {"datasource", "model", "ttft_slo", "itl_slo"} <= variables


@pytest.mark.parametrize("spec", dashboards.dashboard_specs(), ids=lambda s: s.uid)
def test_queries_use_only_contract_metrics(spec: dashboards.DashboardSpec) -> None:
    allowed = contract_metric_names()
    assert "kvrelay_time_to_first_token_seconds" in allowed  # the parser read the contract
    for panel in spec.panels():
        assert panel.queries, f"panel {panel.title!r} has no query"
        for query in panel.queries:
            for name in re.findall(r"\bkvrelay_[a-z_]+", query.expr):
                base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
                assert name in allowed or base in allowed, f"{panel.title!r} uses {name}, not in the contract"
            assert 'model=~"$model"' in query.expr or query.expr.startswith("vector("), query.expr
    for name, expr in spec.annotations:
        names = re.findall(r"\bkvrelay_[a-z_]+", expr)
        assert names and set(names) <= allowed, f"annotation {name!r} uses {names}"


def test_expand_variables_leaves_no_grafana_variable() -> None:
    for spec in dashboards.dashboard_specs():
        for panel in spec.panels():
            for query in panel.queries:
                expanded = dashboards.expand_variables(query.expr)
                assert "$" not in expanded, expanded
    expanded = dashboards.expand_variables('x{model=~"$model"}[$__rate_interval]', model="m")
    assert expanded == 'x{model=~"m"}[1m]'


def test_issue_panels_are_present() -> None:
    titles = {spec.uid: {p.title for p in spec.panels()} for spec in dashboards.dashboard_specs()}
    assert {"Requests/s by status", "Time to first token vs SLO", "Tokens/s"} <= titles["kvrelay-overview"]
    assert {"Desired vs ready replicas", "Prefill : decode ratio", "KV-cache use"} <= titles["kvrelay-pools"]
    kv_titles = {"KV transfer latency", "KV transfer bandwidth", "KV held for transfer"}
    assert kv_titles <= titles["kvrelay-kv-relay"]
    assert {"Decisions by reason", "TTFT: SLO vs observed"} <= titles["kvrelay-autoscaler"]
