"""Alert rules: the chart's rules file passes `promtool check rules` and the promtool unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chart_helpers import CHART, EXAMPLES, MONITORING_API, Render, by_kind

HERE = Path(__file__).resolve().parent
RULES_FILE = "kvrelay-alerts.rules.yaml"
ALERTS = {
    "KvrelayTTFTSLOBurn",
    "KvrelayITLSLOBurn",
    "KvrelayPoolAtMaxWhileSLOViolated",
    "KvrelayKVTransferFailures",
    "KvrelayOperatorDown",
}


def rules_text(render: Render, *args: str) -> str:
    """The plain rules file the chart ships in its alerts ConfigMap."""
    manifests = render(*args, "--set", "alerts.configMap.enabled=true")
    (config_map,) = [m for m in by_kind(manifests, "ConfigMap") if RULES_FILE in m.get("data", {})]
    return config_map["data"][RULES_FILE]


def promtool_run(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=["default", *[p.stem for p in EXAMPLES]])
def test_promtool_check_rules(render: Render, promtool: Path, tmp_path: Path, values: Path | None) -> None:
    args = ("-f", str(values)) if values else ()
    (tmp_path / RULES_FILE).write_text(rules_text(render, *args))
    done = promtool_run(promtool, "check", "rules", RULES_FILE, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout + done.stderr


def test_promtool_unit_tests(render: Render, promtool: Path, tmp_path: Path) -> None:
    (tmp_path / RULES_FILE).write_text(rules_text(render))
    shutil.copy(HERE / "alerts.promtool.yaml", tmp_path)
    done = promtool_run(promtool, "test", "rules", "alerts.promtool.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        case["alertname"]
        for t in yaml.safe_load((HERE / "alerts.promtool.yaml").read_text())["tests"]
        for case in t["alert_rule_test"]
    }
    assert tested == ALERTS, "every alert needs a promtool test"


def test_promtool_unit_tests_catch_a_wrong_threshold(render: Render, promtool: Path, tmp_path: Path) -> None:
    # With a 10s TTFT SLO the "slow" model (4.75s) no longer alerts, so the expectation must fail.
    (tmp_path / RULES_FILE).write_text(rules_text(render, "--set", "alerts.slo.ttftSeconds=10"))
    shutil.copy(HERE / "alerts.promtool.yaml", tmp_path)
    done = promtool_run(promtool, "test", "rules", "alerts.promtool.yaml", cwd=tmp_path)
    assert done.returncode != 0
    assert "KvrelayTTFTSLOBurn" in done.stdout + done.stderr


def test_prometheusrule_and_plain_file_carry_the_same_rules(render: Render) -> None:
    (rule,) = by_kind(render("--api-versions", MONITORING_API), "PrometheusRule")
    plain = yaml.safe_load(rules_text(render))
    assert rule["spec"] == plain
    assert {r["alert"] for g in plain["groups"] for r in g["rules"]} == ALERTS
    labelled = render("--api-versions", MONITORING_API, "--set", "alerts.labels.release=prom")
    assert by_kind(labelled, "PrometheusRule")[0]["metadata"]["labels"]["release"] == "prom"
    assert not by_kind(
        render("--api-versions", MONITORING_API, "--set", "alerts.enabled=false"), "PrometheusRule"
    )


def test_limited_reason_regex_matches_exactly_the_bound_codes() -> None:
    from kvrelay_operator.autoscaler.types import BOUND_CODES, ReasonCode

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    regex = re.compile(values["alerts"]["limitedReasonRegex"])  # PromQL anchors =~ at both ends
    for code in ReasonCode:
        assert bool(regex.fullmatch(code.value)) is (code in BOUND_CODES), code
