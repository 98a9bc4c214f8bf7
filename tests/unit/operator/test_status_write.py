"""handlers._write_status: a conflict re-reads and recomputes; no answer or a server error (an API server or
etcd restarting) is retried a bounded number of times, since kopf does not retry an event handler; a
model deleted before the write leaves nothing to write; a request error is raised at once."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kvrelay_operator import api, handlers


class FlakyKube:
    """patch_status fails with the given statuses first, then writes; get_model returns the stored model."""

    def __init__(self, failures: list[int]) -> None:
        self.failures = list(failures)
        self.model = {
            "metadata": {"namespace": "ns", "name": "m", "uid": "u", "resourceVersion": "1"},
            "status": {},
        }
        self.patches: list[dict[str, Any]] = []
        self.deleted = False

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], version: str | None
    ) -> dict[str, Any]:
        if self.failures:
            raise ApiException(status=self.failures.pop(0), reason="boom")
        self.patches.append(patch)
        version = str(int(self.model["metadata"]["resourceVersion"]) + 1)
        self.model = {**self.model, "metadata": {**self.model["metadata"], "resourceVersion": version},
                      "status": {**self.model["status"], **patch}}  # fmt: skip
        return self.model

    def get_model(self, namespace: str, name: str) -> dict[str, Any]:
        if self.deleted:
            raise ApiException(status=404, reason="Not Found")
        return self.model


class State:
    def __init__(self, kube: FlakyKube) -> None:
        self.kube = kube


def _ready(parent: dict[str, Any]) -> api.DisaggregatedModelStatus:
    return api.DisaggregatedModelStatus(phase="Ready", observed_generation=3)


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers.time, "sleep", lambda _s: None)
    handlers._LAST_WRITTEN.clear()


@pytest.mark.parametrize("failures", [[0], [503, 0, 500], [409, 0]])
def test_transient_failures_are_retried_until_written(failures: list[int]) -> None:
    kube = FlakyKube(failures)
    assert handlers._write_status(State(kube), dict(kube.model), _ready) is True  # type: ignore[arg-type]
    assert kube.patches == [{"phase": "Ready", "observedGeneration": 3}]


def test_a_request_error_is_not_retried() -> None:
    kube = FlakyKube([422])
    with pytest.raises(ApiException):
        handlers._write_status(State(kube), dict(kube.model), _ready)  # type: ignore[arg-type]
    assert kube.patches == []


def test_attempts_are_bounded() -> None:
    kube = FlakyKube([0] * 20)
    assert handlers._write_status(State(kube), dict(kube.model), _ready, attempts=4) is False  # type: ignore[arg-type]
    assert len(kube.failures) == 16


@pytest.mark.parametrize("failures", [[404], [409, 404]])
def test_a_model_deleted_before_the_write_leaves_nothing_to_write(failures: list[int]) -> None:
    # A child's event during the model's cascade deletion: the patch (or the re-read after a
    # conflict) finds the model gone, which must not fail the handler.
    kube = FlakyKube(failures)
    kube.deleted = 404 in failures[1:]
    handlers._LAST_WRITTEN[("ns", "m")] = dict(kube.model)
    assert handlers._write_status(State(kube), dict(kube.model), _ready) is True  # type: ignore[arg-type]
    assert kube.patches == []
    assert ("ns", "m") not in handlers._LAST_WRITTEN
