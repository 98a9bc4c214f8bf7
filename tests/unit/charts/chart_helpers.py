"""Shared helpers of the chart tests: paths, finding helm/promtool, rendering the chart."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "kvrelay"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
MONITORING_API = "monitoring.coreos.com/v1"
# helm's offline default Kubernetes version is old; render as the oldest release we support.
KUBE_VERSION = "1.30.0"

Render = Callable[..., list[dict]]


def find_helm() -> Path:
    """The helm binary: $KVRELAY_TOOLS_BIN/helm, else installed (cached) by hack/install-tools.sh."""
    tools = os.environ.get("KVRELAY_TOOLS_BIN")
    if not tools:
        done = subprocess.run(
            ["bash", str(ROOT / "hack" / "install-tools.sh")], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            pytest.skip(f"helm unavailable: hack/install-tools.sh failed: {done.stderr[-500:]}")
        tools = done.stdout.strip().splitlines()[-1]
    path = Path(tools) / "helm"
    if not path.is_file():
        pytest.skip(f"helm not found at {path}")
    return path


def find_promtool() -> Path:
    """promtool from PATH (Debian's prometheus package, see hack/install-prometheus.sh)."""
    if (ROOT / "hack" / "install-prometheus.sh").is_file() and not shutil.which("promtool"):
        subprocess.run(
            ["bash", str(ROOT / "hack" / "install-prometheus.sh")], capture_output=True, timeout=600
        )
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not on PATH: apt-get install -y --no-install-recommends prometheus")
    return Path(found)


def helm_template(helm: Path, *args: str) -> str:
    """`helm template` of the chart; raises with helm's stderr on failure."""
    cmd = [str(helm), "template", "t", str(CHART), "--namespace", "kvrelay-system"]
    cmd += ["--kube-version", KUBE_VERSION, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return done.stdout


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    """The manifests of one kind."""
    return [m for m in manifests if m["kind"] == kind]
