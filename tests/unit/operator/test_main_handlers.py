"""main.py command line and handler loading, and handlers.py settings (no cluster)."""

from __future__ import annotations

import sys

import pytest
from kvrelay_operator import handlers, main


def test_parser_scopes_and_defaults() -> None:
    args = main.build_parser().parse_args(["-n", "a", "-n", "b", "--no-leader-elect"])
    assert args.namespace == ["a", "b"] and not args.all_namespaces and not args.leader_elect
    assert main.build_parser().parse_args(["-A"]).all_namespaces
    assert main.build_parser().parse_args([]).leader_elect  # leader election is on by default
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["-A", "-n", "x"])


def test_load_handlers_registers_the_handlers_and_the_autoscaler_timer() -> None:
    main.load_handlers()
    assert "kvrelay_operator.handlers" in sys.modules
    assert "kvrelay_operator.autoscaler.kopf_timer" in sys.modules


def test_an_autoscaler_that_cannot_import_stops_the_operator(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # None in sys.modules makes `import` raise ImportError, as a missing dependency would.
    monkeypatch.setitem(sys.modules, "kvrelay_operator.autoscaler.kopf_timer", None)
    with pytest.raises(SystemExit) as exited:
        main.load_handlers()
    assert exited.value.code not in (0, None)  # a message: printed to stderr, exit status 1
    assert "kvrelay_operator.autoscaler.kopf_timer" in str(exited.value.code)
    assert any(r.levelname == "CRITICAL" for r in caplog.records)
    # The console script fails before it serves anything (metrics, Lease, kopf).
    with pytest.raises(SystemExit) as exited:
        main.main(["--no-leader-elect", "--metrics-port", "0"])
    assert exited.value.code not in (0, None)


def test_operator_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRELAY_WORKER_IMAGE", "reg/w:9")
    timings = ("KVRELAY_POD_METRICS_TIMEOUT_SECONDS", "KVRELAY_DELETION_COST_SETTLE_SECONDS")
    for unset in ("KVRELAY_PROMETHEUS_URL", *timings):
        monkeypatch.delenv(unset, raising=False)
    config = handlers.OperatorConfig.from_env()
    assert config.default_image == "reg/w:9" and config.prometheus_url is None
    assert config.pod_metrics_timeout_seconds == 1.0 and config.deletion_cost_settle_seconds == 2.0
    monkeypatch.setenv("KVRELAY_POD_METRICS_TIMEOUT_SECONDS", "5")
    monkeypatch.setenv("KVRELAY_DELETION_COST_SETTLE_SECONDS", "0.5")
    config = handlers.OperatorConfig.from_env()
    assert config.pod_metrics_timeout_seconds == 5.0 and config.deletion_cost_settle_seconds == 0.5
    monkeypatch.setenv("KVRELAY_POD_METRICS_TIMEOUT_SECONDS", "0")  # must be > 0: refused, not ignored
    with pytest.raises(ValueError, match="pod_metrics_timeout_seconds"):
        handlers.OperatorConfig.from_env()
