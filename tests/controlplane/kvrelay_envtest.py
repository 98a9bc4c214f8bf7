"""A real etcd + kube-apiserver for tests and benchmarks, started envtest-style (no kubelet).

Binaries come from KUBEBUILDER_ASSETS, else from hack/build-controlplane.sh (built once, cached).
Auth is a static token for a `system:masters` user; RBAC is on. Everything lives in a temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kvrelay_worker.ports import free_port
from kvrelay_worker.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "kvrelay-test-admin-token"
T = TypeVar("T")


@dataclass
class ControlPlane:
    """A running control plane: where it listens and how to reach it."""

    server: str
    token: str
    kubeconfig: Path
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def get(self, path: str, timeout: float = 10.0) -> bytes:
        """GET a raw API path as the admin (e.g. /metrics)."""
        request = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout, context=_insecure_tls()) as response:
            return response.read()


def find_assets() -> tuple[Path | None, str]:
    """The dir holding kube-apiserver and etcd, or None and the reason it is unavailable."""
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env:
        path = Path(env)
        if (path / "kube-apiserver").is_file() and (path / "etcd").is_file():
            return path, ""
        return None, f"KUBEBUILDER_ASSETS={env} lacks kube-apiserver or etcd"
    if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
        return None, "no KUBEBUILDER_ASSETS and no Go toolchain to build kube-apiserver"
    env_path = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/local/go/bin"}
    try:
        out = subprocess.run(
            ["bash", str(REPO_ROOT / "hack" / "build-controlplane.sh")],
            check=True, capture_output=True, text=True, timeout=3600, env=env_path,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return None, f"hack/build-controlplane.sh failed: {getattr(exc, 'stderr', '')[-2000:]}"
    return Path(out.stdout.strip().splitlines()[-1]), ""


def find_kubectl() -> tuple[Path | None, str]:
    """kubectl from KVRELAY_TOOLS_BIN, else from hack/install-tools.sh (cached)."""
    env = os.environ.get("KVRELAY_TOOLS_BIN")
    if env and (Path(env) / "kubectl").is_file():
        return Path(env) / "kubectl", ""
    try:
        out = subprocess.run(
            ["bash", str(REPO_ROOT / "hack" / "install-tools.sh")],
            check=True, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return None, f"hack/install-tools.sh failed: {getattr(exc, 'stderr', '')[-2000:]}"
    return Path(out.stdout.strip().splitlines()[-1]) / "kubectl", ""


def wait_for(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> T:
    """Polls until condition() is truthy (returning it) or raises TimeoutError naming what."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # conditions may race object creation; retry until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}; last error: {last_exc}")


def _insecure_tls() -> ssl.SSLContext:
    # Only for raw probes of 127.0.0.1 (health, /metrics); clients use the kubeconfig's CA.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _wait_http(url: str, deadline_s: float, proc: subprocess.Popen[bytes], token: str | None = None) -> None:
    """Polls url until it answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=2, context=_insecure_tls()
            ) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {deadline_s}s: {last}")


def _write_kubeconfig(path: Path, server: str, token: str, ca: Path) -> None:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster: {{server: "{server}", certificate-authority: "{ca}"}}
users:
- name: admin
  user: {{token: "{token}"}}
contexts:
- name: envtest
  context: {{cluster: envtest, user: admin, namespace: default}}
current-context: envtest
"""
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, grace_s=10)


@contextlib.contextmanager
def control_plane(assets: Path, start_timeout_s: float = 90.0) -> Iterator[ControlPlane]:
    """Starts etcd and kube-apiserver in a temp dir; stops both and removes the dir on exit."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is needed to make the service-account signing key")
    workdir = Path(tempfile.mkdtemp(prefix="kvrelay-envtest-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd_log = (workdir / "etcd.log").open("wb")
        processes.append(
            subprocess.Popen(
                [str(assets / "etcd"), "--name=envtest", f"--data-dir={workdir / 'etcd'}",
                 f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                 f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                 f"--initial-cluster=envtest={peer_url}", "--unsafe-no-fsync=true",
                 "--log-level=warn"],
                stdout=etcd_log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        _wait_http(f"{etcd_url}/health", start_timeout_s, processes[0])

        certs = workdir / "certs"
        certs.mkdir()
        subprocess.run(
            ["openssl", "genrsa", "-out", str(certs / "sa.key"), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(certs / "sa.key"), "-pubout", "-out", str(certs / "sa.pub")],
            check=True, capture_output=True,
        )  # fmt: skip
        (certs / "tokens.csv").write_text(f'{ADMIN_TOKEN},kvrelay-admin,1,"system:masters"\n')
        api_log = (workdir / "kube-apiserver.log").open("wb")
        processes.append(
            subprocess.Popen(
                [str(assets / "kube-apiserver"), f"--etcd-servers={etcd_url}", f"--cert-dir={certs}",
                 f"--secure-port={api_port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                 "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
                 "--disable-admission-plugins=ServiceAccount", "--authorization-mode=RBAC",
                 f"--token-auth-file={certs / 'tokens.csv'}",
                 f"--service-account-issuer=https://127.0.0.1:{api_port}/",
                 f"--service-account-key-file={certs / 'sa.pub'}",
                 f"--service-account-signing-key-file={certs / 'sa.key'}"],
                stdout=api_log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        server = f"https://127.0.0.1:{api_port}"
        _wait_http(f"{server}/readyz", start_timeout_s, processes[1], token=ADMIN_TOKEN)
        kubeconfig = workdir / "kubeconfig"
        # The apiserver wrote a self-signed serving cert for 127.0.0.1 into --cert-dir; trust exactly it.
        _write_kubeconfig(kubeconfig, server, ADMIN_TOKEN, certs / "apiserver.crt")
        yield ControlPlane(server, ADMIN_TOKEN, kubeconfig, workdir, processes)
    finally:
        for proc in reversed(processes):
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def get_json(kubectl: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> dict[str, Any]:
    """`kubectl get ... -o json`, parsed."""
    result = kubectl("get", *args, "-o", "json")
    if result.returncode != 0:
        raise RuntimeError(f"kubectl get {' '.join(args)}: {result.stderr}")
    return json.loads(result.stdout)


def example(name: str) -> str:
    """Text of a file in examples/."""
    return (REPO_ROOT / "examples" / name).read_text()


def run_kubectl(kubectl: Path, cp: ControlPlane, *args: str) -> str:
    """Runs kubectl against cp, raising with its stderr on failure; returns stdout."""
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
    result = subprocess.run([str(kubectl), *args], capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout
