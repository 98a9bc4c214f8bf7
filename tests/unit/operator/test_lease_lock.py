"""main.lease_lock: an API server that cannot be reached is a failed try of the leader election (as an API
error is), never an exception out of its renew loop (which left kopf running with the Lease unrenewed)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kvrelay_operator.main import lease_lock
from urllib3.exceptions import MaxRetryError


def _unreachable(*_: Any, **__: Any) -> Any:
    raise MaxRetryError(None, "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l", "Connection refused")


def test_unreachable_api_server_is_a_failed_try_and_recovery_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = lease_lock("l", "ns", "me")
    api = lock.api_instance
    api.read_namespaced_lease = _unreachable
    api.create_namespaced_lease = _unreachable
    api.replace_namespaced_lease = _unreachable
    with caplog.at_level(logging.INFO, logger="kvrelay_operator"):
        found, error = lock.get("l", "ns")
        assert found is False and isinstance(error, ApiException) and error.status == 0
        lock.get_lease_spec = lambda record, current=None: None  # the record's content is not under test
        assert lock.create("l", "ns", object()) is False
        lock.lease_reference = type("Lease", (), {"spec": None})()
        assert lock.update("l", "ns", object()) is False
        assert sum("cannot reach the API server" in r.getMessage() for r in caplog.records) == 3
        sentinel = object()
        api.read_namespaced_lease = lambda name, namespace: sentinel
        lock.get_lock_object = lambda lease: ("record", lease)
        assert lock.get("l", "ns") == (True, ("record", sentinel))
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_api_errors_still_come_back_as_the_library_returns_them() -> None:
    lock = lease_lock("l", "ns", "me")

    def not_found(*_: Any, **__: Any) -> Any:
        raise ApiException(status=404, reason="Not Found")

    lock.api_instance.read_namespaced_lease = not_found
    found, error = lock.get("l", "ns")
    assert found is False and error.status == 404
