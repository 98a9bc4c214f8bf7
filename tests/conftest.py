"""Suite-wide policy: under CI a skipped test is a failure, enforced here and nowhere else.

Tests that cannot run on a machine (no kube-apiserver, no helm, no Prometheus) just
`pytest.skip(reason)`. Locally that stays a skip; when the `CI` environment variable is true
(`true`, `1` or `yes`, any case; `.ci/run` sets `CI=true`) every skip, whether from a test, a fixture,
a `skip`/`skipif` mark or a whole module, is reported as a failure that names the skip's reason.
xfail is not a skip and keeps its own meaning (a strict xfail that passes still fails).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

pytest_plugins = ["pytester"]  # for the policy's own test (tests/unit/test_ci_skip_policy.py)

CI_TRUE = frozenset({"true", "1", "yes"})


def ci_enabled() -> bool:
    """Whether the `CI` environment variable is set to a true value."""
    return os.environ.get("CI", "").strip().lower() in CI_TRUE


def _skip_reason(longrepr: Any) -> str:
    """The reason of a skip report (pytest stores (path, line, "Skipped: reason"))."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _skip_reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI={os.environ.get('CI')} (a skip is a failure in CI): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    # An xfail's report is also "skipped", but carries `wasxfail`: it is not a skip.
    if report.skipped and not hasattr(report, "wasxfail") and ci_enabled():
        _as_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and ci_enabled():  # a module-level pytest.skip / importorskip
        _as_failure(report)
