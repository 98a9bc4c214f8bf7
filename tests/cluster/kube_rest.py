"""Raw JSON access to the API server for the node agent: paths in, dicts out (no generated models).

The official client's ApiClient does auth and TLS from a kubeconfig; it is safe to share across threads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class Rest:
    """GET/POST/PUT/PATCH/DELETE of API paths as dicts, and watch streams as event dicts."""

    def __init__(self, kubeconfig: str) -> None:
        self.configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=self.configuration)
        self._api = client.ApiClient(self.configuration)

    @property
    def server(self) -> str:
        return str(self.configuration.host)

    @property
    def ca_file(self) -> str | None:
        return self.configuration.ssl_ca_cert

    def _send(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "",
        timeout: float = 30,
        stream: bool = False,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        params = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in (query or {}).items()]
        method, url, headers, body, _ = self._api.param_serialize(
            method=method, resource_path=path, query_params=params or None,
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )  # fmt: skip
        response = self._api.call_api(method, url, header_params=headers, body=body, _request_timeout=timeout)
        if stream and 200 <= response.status < 300:
            return response.response  # the urllib3 response, not yet read
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=response.data)
        return json.loads(response.data) if response.data else {}

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        return self._send("GET", path, query)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", path, body=body)

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("PUT", path, body=body)

    def patch(self, path: str, body: dict[str, Any], content_type: str = SMP) -> dict[str, Any]:
        return self._send("PATCH", path, body=body, content_type=content_type)

    def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._send("DELETE", path, body=body)

    def watch(self, path: str, timeout_s: int, **query: Any) -> Iterator[dict[str, Any]]:
        """Events of a watch (query: resourceVersion, fieldSelector...) until the server ends it."""
        query = {**query, "watch": True, "timeoutSeconds": timeout_s, "allowWatchBookmarks": True}
        response = self._send("GET", path, query, timeout=timeout_s + 30, stream=True)
        try:
            for line in iter_resp_lines(response):
                if line:
                    yield json.loads(line)
        finally:
            response.release_conn()


def not_found(exc: BaseException) -> bool:
    """Whether exc is the API's 404."""
    return isinstance(exc, ApiException) and exc.status == 404


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"
