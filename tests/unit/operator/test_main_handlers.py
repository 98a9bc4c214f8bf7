"""main.py command line and the pure helpers of handlers.py (no cluster)."""

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


def test_load_handlers_registers_the_autoscaler_timer_when_present() -> None:
    main.load_handlers()
    assert "kvrelay_operator.handlers" in sys.modules
    assert "kvrelay_operator.autoscaler.kopf_timer" in sys.modules


def test_hash_changes_with_content_and_fingerprint_with_replicas() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"replicas": 1},
    }
    a = handlers._with_hash(deployment)
    b = handlers._with_hash({**deployment, "spec": {"replicas": 2}})
    assert (
        a["metadata"]["annotations"][handlers.HASH_ANNOTATION]
        != b["metadata"]["annotations"][handlers.HASH_ANNOTATION]
    )
    assert handlers._with_hash(deployment) == a  # deterministic
    assert handlers._fingerprint(a).endswith("/1") and handlers._fingerprint(b).endswith("/2")
    assert "annotations" not in deployment["metadata"]  # the input is not mutated


def test_operator_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRELAY_WORKER_IMAGE", "reg/w:9")
    monkeypatch.delenv("KVRELAY_PROMETHEUS_URL", raising=False)
    config = handlers.OperatorConfig.from_env()
    assert config.default_image == "reg/w:9" and config.prometheus_url is None
