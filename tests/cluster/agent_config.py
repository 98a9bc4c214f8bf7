"""What every pod of one node agent shares: the node, its network, the "image" and the knobs."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pod_network import PodNetwork


@dataclass
class AgentConfig:
    """One node agent's settings (the CLI's flags, parsed)."""

    node: str
    network: PodNetwork
    pod_cidr: str
    host_ip: str
    state_dir: Path
    log_dir: Path
    api_host: str  # where pods reach the API server (no kube-proxy routes the kubernetes Service)
    api_port: int
    ca_file: str | None = None
    # The "image" is this host: these dirs first on PATH, these host paths bound (read-only) at
    # their destinations, these variables set unless the pod sets them.
    image_path: list[str] = field(default_factory=list)
    image_binds: list[tuple[str, str]] = field(default_factory=list)
    # This fake image's interpreter and source tree where they live under a path a pod's own /tmp
    # (or a volume) would hide: mounted last, over the volumes, at their own paths.
    runtime_binds: list[str] = field(default_factory=list)
    image_env: dict[str, str] = field(default_factory=dict)
    allocatable: dict[str, str] = field(default_factory=dict)
    max_probe_period_s: float = 1.0
    max_backoff_s: float = 10.0
    python: str = sys.executable

    def image_environment(self) -> dict[str, str]:
        """The variables an image would bring: PATH (prepends first), HOME, and --image-env."""
        path = ":".join([*self.image_path, os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
        env = {"PATH": path, "HOME": os.environ.get("HOME", "/root")}
        return {**env, **self.image_env}

    def service_environment(self) -> dict[str, str]:
        """The kubernetes Service's variables, pointing at the API server's real address."""
        host, port = self.api_host, str(self.api_port)
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
        }


def now_rfc3339() -> str:
    """The API's timestamp format, to the second."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
