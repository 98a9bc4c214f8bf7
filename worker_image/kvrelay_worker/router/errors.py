"""OpenAI-style errors (one exception type that knows its HTTP status and JSON body), and worker failures."""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """An error the router returns to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}  # HTTP headers of the error response (a 503's Retry-After)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def server_error(
    message: str, code: str | None = None, status: int = 500, headers: dict[str, str] | None = None
) -> OpenAIError:
    return OpenAIError(
        status, message, "server_error" if status == 500 else "service_unavailable", None, code, headers
    )


class WorkerFailed(Exception):
    """A worker call failed.

    `worker_down`: the worker itself looks gone (stop routing to it). `reason`: why the request may go on
    elsewhere, `worker_lost` | `draining` | `stalled`, or None when the request itself was refused.
    """

    def __init__(self, message: str, worker_down: bool, reason: str | None = None) -> None:
        super().__init__(message)
        self.worker_down = worker_down
        self.reason = reason or ("worker_lost" if worker_down else None)
