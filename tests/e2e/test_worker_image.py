"""The worker image's Dockerfile (static checks; no Docker engine here) and the entrypoint it runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from kvrelay_worker.model.tiny import make_tiny_model
from worker_fixtures import run_worker

DOCKERFILE = Path(__file__).resolve().parents[2] / "worker_image" / "Dockerfile"
pytestmark = pytest.mark.e2e


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _entrypoint() -> list[str]:
    (value,) = [rest for op, rest in _instructions() if op == "ENTRYPOINT"]
    return json.loads(value)


def test_dockerfile_is_pinned_non_root_with_one_entrypoint() -> None:
    ins = _instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms and all(re.match(r"nvidia/cuda:\d+\.\d+\.\d+-", f) for f in froms), froms
    users = [rest for op, rest in ins if op == "USER"]
    assert users and not users[-1].startswith(("root", "0")), users
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    for pkg in ("rdma-core", "ibverbs-providers", "libibverbs1"):
        assert pkg in runs
    for spec in re.findall(r"pip install [^&]*", runs):
        named = [t for t in spec.split()[2:] if not t.startswith("-") and not t.startswith('".')]
        assert all("==" in t for t in named), f"unpinned pip install: {spec}"
    assert _entrypoint() == ["kvrelay-worker"]
    assert "memlock" in DOCKERFILE.read_text() and "UCX_NET_DEVICES" in DOCKERFILE.read_text()


def test_image_installs_every_role_the_chart_runs_from_it() -> None:
    # The chart runs the operator from this image (command kvrelay-operator), so it needs its extra.
    runs = " ".join(rest for op, rest in _instructions() if op == "RUN")
    (extras,) = re.findall(r'pip install [^&]*"\.\[([a-z,]+)\]"', runs)
    assert {"worker", "router", "operator"} <= set(extras.split(","))


def test_entrypoint_help_lists_roles() -> None:
    script = Path(sys.executable).with_name(_entrypoint()[0])
    assert script.exists(), f"console script {script} is not installed (pip install -e .)"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in (
        "--role",
        "--grpc-port",
        "--metrics-port",
        "--kv-backend",
        "--kv-port",
        "--kv-failure-policy",
    ):
        assert flag in out.stdout
    assert "prefill,decode,colocated,router" in out.stdout.replace(" ", "")
    # --role router hands every other flag (even --help) to the router
    out = subprocess.run(
        [str(script), "--role", "router", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "usage:" in out.stdout and "--kv-failure-policy" not in out.stdout, (
        out.stderr
    )
    out = subprocess.run(
        [str(script), "--role", "decode", "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr


def test_entrypoint_starts_a_real_worker(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    with run_worker("prefill", model, kv_backend="nixl") as worker:
        client = grpcclient.InferenceServerClient(worker.grpc_address)
        assert client.is_server_ready() and client.is_model_ready("kvrelay_prefill")
        assert worker.proc.args[0].endswith("kvrelay-worker")
    assert worker.proc.returncode == 0, worker.log()
