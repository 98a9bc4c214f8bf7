"""The suite's CI policy (tests/conftest.py): under CI a skip is a failure naming its reason; xfail is not."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

POLICY = Path(__file__).resolve().parents[1] / "conftest.py"

SAMPLE = """
import pytest

@pytest.fixture
def no_tool():
    pytest.skip("no frobnicator on this machine")

def test_passes():
    pass

def test_skips_in_body():
    pytest.skip("no kube-apiserver here")

def test_skips_in_fixture(no_tool):
    pass

@pytest.mark.skipif(True, reason="marked away")
def test_skipif_mark():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_strict_xfail_fails_as_expected():
    assert False

@pytest.mark.xfail(reason="fixed now", strict=True)
def test_strict_xfail_that_passes():
    pass
"""

MODULE_SKIP = """
import pytest
pytest.skip("whole module needs a GPU", allow_module_level=True)

def test_never_collected():
    pass
"""


def _policy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvrelay_ci_skip_policy", POLICY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
     (None, False), ("", False), ("false", False), ("0", False), ("no", False)],
)  # fmt: skip
def test_ci_is_any_true_value(monkeypatch: pytest.MonkeyPatch, value: str | None, enabled: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert _policy().ci_enabled() is enabled


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(POLICY.read_text())
    pytester.makepyfile(test_sample=SAMPLE, test_module_skip=MODULE_SKIP)
    return pytester


def test_under_ci_every_skip_fails_naming_its_reason(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest_subprocess("-rA", "-p", "no:cacheprovider", "test_sample.py")
    # A skip in a test body fails; a skipping fixture or skipif mark fails the test's setup (an
    # error); the strict xfail still xfails, and the strict xfail that passed fails as it always did.
    result.assert_outcomes(passed=1, failed=2, errors=2, xfailed=1)
    out = result.stdout.str()
    for reason in ("no kube-apiserver here", "no frobnicator on this machine", "marked away"):
        assert f"skipped under CI=true (a skip is a failure in CI): {reason}" in out, reason
    assert "[XPASS(strict)] fixed now" in out
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # A module-level skip fails its collection.
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "test_module_skip.py")
    result.assert_outcomes(errors=1)
    assert "(a skip is a failure in CI): whole module needs a GPU" in result.stdout.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_without_ci_a_skip_stays_a_skip(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=4, failed=1, xfailed=1)
    assert "a skip is a failure" not in result.stdout.str()
