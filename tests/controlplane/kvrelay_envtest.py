"""A real etcd + kube-apiserver for tests and benchmarks, started envtest-style (no kubelet).

With `controllers=True`, kube-controller-manager and kube-scheduler run too; kwok_nodes.py adds fake
nodes. Binaries come from KUBEBUILDER_ASSETS, else from hack/build-controlplane.sh (built once, cached).
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

from kvrelay_worker.ports import free_port, free_ports
from kvrelay_worker.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "kvrelay-test-admin-token"
CORE_BINARIES = ("kube-apiserver", "etcd")
CONTROLLER_BINARIES = ("kube-controller-manager", "kube-scheduler")
SERVICE_CIDR = "10.0.0.0/24"
# The first address of SERVICE_CIDR: the `kubernetes` Service, which in-cluster clients dial.
KUBERNETES_SERVICE_IP = "10.0.0.1"
LOG_TAIL_BYTES = 4000
T = TypeVar("T")


@dataclass
class ControlPlane:
    """A running control plane: where it listens and how to reach it."""

    server: str
    token: str
    kubeconfig: Path
    workdir: Path
    ca_file: Path
    host: str
    port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def writes(self, since: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Audit events of the write requests the API server answered after byte offset `since` of
        its audit log, and the new offset: who wrote what (user agent, verb, objectRef)."""
        path = self.workdir / "audit.log"
        with path.open("rb") as log:
            log.seek(since)
            data = log.read()
        end = since + data.rfind(b"\n") + 1
        events = [json.loads(line) for line in data[: end - since].splitlines() if line.strip()]
        return events, end

    def restart_apiserver(self, down_s: float, *, kill: bool = False, timeout_s: float = 90.0) -> float:
        """Stops kube-apiserver (SIGTERM, or SIGKILL with `kill`: a crash), keeps it down `down_s`
        seconds, then starts it again with the same command line (port, certs, etcd, audit log);
        returns the seconds from that start until it answered /readyz.

        After SIGTERM it refuses new connections at once but keeps open watches until they end, so
        with clients watching it is SIGKILLed when the 10 s grace runs out."""
        self._restart("kube-apiserver", down_s, kill)
        started = time.monotonic()
        self._wait_apiserver_ready(timeout_s)
        return time.monotonic() - started

    def restart_etcd(self, down_s: float, *, kill: bool = False, timeout_s: float = 90.0) -> float:
        """Stops etcd (SIGTERM, or SIGKILL with `kill`), keeps it down `down_s` seconds (the API server
        stays up; requests that need etcd fail or wait meanwhile), then starts it again on the same
        ports and data dir, so what it stored persists; returns the seconds from that start until
        etcd answered /health and the API server /readyz."""
        etcd = self._restart("etcd", down_s, kill)
        started = time.monotonic()
        _wait_http(f"{_flag(etcd, '--listen-client-urls')}/health", timeout_s, etcd,
                   log=self.workdir / "etcd.log")  # fmt: skip
        self._wait_apiserver_ready(timeout_s)
        return time.monotonic() - started

    def _restart(self, name: str, down_s: float, kill: bool) -> subprocess.Popen[bytes]:
        """Stops the component `name`, sleeps `down_s`, runs its command line again (appending to its
        log) and puts the new process in the old one's place in `processes`, which it returns."""
        index = next(i for i, proc in enumerate(self.processes) if _component(proc) == name)
        old = self.processes[index]
        if kill:
            old.kill()
            old.wait(timeout=10)
        else:
            _stop(old)
        time.sleep(down_s)
        with (self.workdir / f"{name}.log").open("ab") as out:
            new = subprocess.Popen(old.args, stdout=out, stderr=subprocess.STDOUT)
        self.processes[index] = new
        return new

    def _wait_apiserver_ready(self, timeout_s: float) -> None:
        apiserver = next(proc for proc in self.processes if _component(proc) == "kube-apiserver")
        _wait_http(f"{self.server}/readyz", timeout_s, apiserver, self.token, self.tls_context(),
                   self.workdir / "kube-apiserver.log")  # fmt: skip

    def tls_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts exactly this control plane's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def get(self, path: str, timeout: float = 10.0) -> bytes:
        """GET a raw API path as the admin (e.g. /metrics)."""
        request = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout, context=self.tls_context()) as response:
            return response.read()

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """One JSON API call as the admin; a refusal raises urllib.error.HTTPError with the API's reason."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.server + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.tls_context()) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            # The Status body says why; HTTPError's own text only has the code.
            exc.msg = f"{exc.msg}: {exc.read().decode(errors='replace')[:2000]}"
            raise


def _component(proc: subprocess.Popen[bytes]) -> str:
    """The binary's name of a process start_logged started (e.g. kube-apiserver)."""
    return Path(str(proc.args[0])).name


def _flag(proc: subprocess.Popen[bytes], name: str) -> str:
    """The value of a `--name=value` argument of a process's command line."""
    prefix = f"{name}="
    return next(str(arg)[len(prefix) :] for arg in proc.args if str(arg).startswith(prefix))


def _missing(path: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not (path / name).is_file()]


def find_assets(*, controllers: bool = False) -> tuple[Path | None, str]:
    """The dir holding kube-apiserver and etcd (and, with controllers, kube-controller-manager and
    kube-scheduler), or None and the reason it is unavailable."""
    required = CORE_BINARIES + (CONTROLLER_BINARIES if controllers else ())
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env:
        missing = _missing(Path(env), required)
        if not missing:
            return Path(env), ""
        return None, (
            f"KUBEBUILDER_ASSETS={env} lacks {', '.join(missing)} "
            "(hack/build-controlplane.sh builds them into the dir it prints)"
        )
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
    path = Path(out.stdout.strip().splitlines()[-1])
    missing = _missing(path, required)
    if missing:
        return None, f"hack/build-controlplane.sh printed {path}, which lacks {', '.join(missing)}"
    return path, ""


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


def cluster_tools_or_skip(controllers: bool = False) -> tuple[Path, Path, Path]:
    """(control-plane assets, kubectl, helm) for a test that installs the chart; pytest.skip says
    which is missing (under CI a skip fails the run, tests/conftest.py)."""
    import pytest

    assets, why = find_assets(controllers=controllers)
    if assets is None:
        pytest.skip(f"no control plane: {why}")
    kubectl, why = find_kubectl()
    if kubectl is None:
        pytest.skip(f"no kubectl: {why}")
    helm = kubectl.parent / "helm"
    if not helm.is_file():
        pytest.skip(f"no helm next to {kubectl}")
    return assets, kubectl, helm


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
    # Only for health probes of kube-controller-manager and kube-scheduler, whose serving certs are
    # self-signed in their own --cert-dir; API clients use the control plane's CA.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _log_tail(path: Path) -> str:
    try:
        return path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
    except OSError:
        return ""


def _wait_http(
    url: str,
    deadline_s: float,
    proc: subprocess.Popen[bytes],
    token: str | None = None,
    context: ssl.SSLContext | None = None,
    log: Path | None = None,
) -> None:
    """Polls url until it answers 200; raises with the tail of `log` if the process dies or time runs out."""
    deadline = time.monotonic() + deadline_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(log) if log else ""
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} before {url} answered; log tail:\n{tail}"
            )
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=2, context=context or _insecure_tls()
            ) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    tail = _log_tail(log) if log else ""
    raise TimeoutError(f"{url} not healthy after {deadline_s}s: {last}; log tail:\n{tail}")


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


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {result.stderr[-2000:]}")


def _make_certs(certs: Path, host: str) -> None:
    """A throwaway CA, the apiserver's serving cert signed by it, and the service-account key pair.

    The serving cert is ours (not the apiserver's self-signed one) so that it can name `host` (a
    bridge address pods in network namespaces dial) and the in-cluster names of the apiserver.
    """
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(certs / "ca.key"), "-out", str(certs / "ca.crt"),
             "-days", "7", "-subj", "/CN=kvrelay-envtest-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    _openssl("req", *ec, "-keyout", str(certs / "apiserver.key"), "-out", str(certs / "apiserver.csr"),
             "-subj", "/CN=kube-apiserver")  # fmt: skip
    ips = dict.fromkeys(["127.0.0.1", host, KUBERNETES_SERVICE_IP])
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
           "kubernetes.default.svc.cluster.local"]  # fmt: skip
    sans = ",".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{name}" for name in dns)])
    (certs / "apiserver.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        f"subjectAltName={sans}\n"
    )
    _openssl("x509", "-req", "-in", str(certs / "apiserver.csr"), "-CA", str(certs / "ca.crt"),
             "-CAkey", str(certs / "ca.key"), "-CAcreateserial", "-CAserial", str(certs / "ca.srl"),
             "-days", "7", "-extfile", str(certs / "apiserver.ext"),
             "-out", str(certs / "apiserver.crt"))  # fmt: skip
    # RSA: the signing key of service-account tokens, for the apiserver and the token controller.
    _openssl("genrsa", "-out", str(certs / "sa.key"), "2048")
    _openssl("rsa", "-in", str(certs / "sa.key"), "-pubout", "-out", str(certs / "sa.pub"))


def start_logged(
    processes: list[subprocess.Popen[bytes]],
    workdir: Path,
    name: str,
    args: list[str],
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    """Starts a component with its output in <workdir>/<name>.log and adds it to `processes` (stopped
    last-first by control_plane); returns it and the log path."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    processes.append(proc)
    return proc, log


def _write_audit_policy(workdir: Path) -> Path:
    # Writes only, at Metadata level, once each (ResponseComplete): tests ask who wrote what, which
    # the API server's request metrics cannot tell (the operator and the controllers share a user).
    path = workdir / "audit-policy.yaml"
    path.write_text(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\n"
        "rules:\n- level: Metadata\n  verbs: [create, update, patch, delete, deletecollection]\n"
        "- level: None\n"
    )
    return path


@contextlib.contextmanager
def control_plane(
    assets: Path,
    start_timeout_s: float = 90.0,
    *,
    controllers: bool = False,
    bind_address: str = "127.0.0.1",
) -> Iterator[ControlPlane]:
    """Starts etcd and kube-apiserver in a temp dir; stops them and removes the dir on exit.

    controllers: also run kube-controller-manager and kube-scheduler (pods then get created, scheduled
    and garbage-collected; nodes come from kwok_nodes.py). bind_address: where the apiserver listens.
    """
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is needed to make the control plane's certificates")
    if controllers and (missing := _missing(assets, CONTROLLER_BINARIES)):
        raise RuntimeError(f"{assets} lacks {', '.join(missing)} (run hack/build-controlplane.sh)")
    # An unspecified bind address listens everywhere; clients then dial loopback.
    host = "127.0.0.1" if bind_address in ("0.0.0.0", "::") else bind_address
    workdir = Path(tempfile.mkdtemp(prefix="kvrelay-envtest-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        local = free_ports(4)
        etcd_port, peer_port, kcm_port, scheduler_port = local
        api_port = free_port(host)
        while api_port in local:  # free_port draws at random; on loopback it may repeat one of these
            api_port = free_port(host)
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd, etcd_log = start_logged(processes, workdir, "etcd", [
            str(assets / "etcd"), "--name=envtest", f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=envtest={peer_url}", "--unsafe-no-fsync=true", "--log-level=warn",
        ])  # fmt: skip
        certs = workdir / "certs"
        certs.mkdir()
        _make_certs(certs, host)  # meanwhile etcd starts
        _wait_http(f"{etcd_url}/health", start_timeout_s, etcd, log=etcd_log)

        (certs / "tokens.csv").write_text(f'{ADMIN_TOKEN},kvrelay-admin,1,"system:masters"\n')
        server = f"https://{f'[{host}]' if ':' in host else host}:{api_port}"
        # Without the controller manager nothing creates namespaces' `default` ServiceAccount, which
        # the ServiceAccount admission plugin would require of every pod.
        admission = [] if controllers else ["--disable-admission-plugins=ServiceAccount"]
        apiserver, api_log = start_logged(processes, workdir, "kube-apiserver", [
            str(assets / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            f"--secure-port={api_port}", f"--bind-address={bind_address}", f"--advertise-address={host}",
            f"--tls-cert-file={certs / 'apiserver.crt'}", f"--tls-private-key-file={certs / 'apiserver.key'}",
            # Published in kube-system/extension-apiserver-authentication, which the controller
            # manager's and scheduler's delegated authentication read (else they log errors forever).
            f"--client-ca-file={certs / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true", *admission,
            "--authorization-mode=RBAC", f"--token-auth-file={certs / 'tokens.csv'}",
            f"--service-account-issuer={server}/",
            f"--service-account-key-file={certs / 'sa.pub'}",
            f"--service-account-signing-key-file={certs / 'sa.key'}",
            f"--audit-policy-file={_write_audit_policy(workdir)}", "--audit-log-format=json",
            f"--audit-log-path={workdir / 'audit.log'}", "--audit-log-mode=blocking",
        ])  # fmt: skip
        kubeconfig = workdir / "kubeconfig"
        _write_kubeconfig(kubeconfig, server, ADMIN_TOKEN, certs / "ca.crt")
        cp = ControlPlane(
            server, ADMIN_TOKEN, kubeconfig, workdir, certs / "ca.crt", host, api_port, processes
        )
        _wait_http(f"{server}/readyz", start_timeout_s, apiserver, ADMIN_TOKEN, cp.tls_context(), api_log)
        if controllers:
            _start_controllers(cp, assets, kcm_port, scheduler_port, start_timeout_s)
        yield cp
    finally:
        for proc in reversed(processes):
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _start_controllers(
    cp: ControlPlane, assets: Path, kcm_port: int, scheduler_port: int, start_timeout_s: float
) -> None:
    """kube-controller-manager and kube-scheduler as the admin, leader election off; waits for both."""
    kubeconfig = str(cp.kubeconfig)
    certs = cp.workdir / "certs"
    # The authn/authz kubeconfigs let their secure ports check tokens (as kubeadm sets them up).
    delegated = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                 f"--authorization-kubeconfig={kubeconfig}"]  # fmt: skip
    kcm, kcm_log = start_logged(cp.processes, cp.workdir, "kube-controller-manager", [
        str(assets / "kube-controller-manager"), *delegated, "--leader-elect=false",
        f"--secure-port={kcm_port}", "--bind-address=127.0.0.1", f"--cert-dir={cp.workdir / 'kcm-certs'}",
        # All on-by-default controllers (off by default: bootstrap-signer, token-cleaner and
        # selinux-warning, none of which matter here). Those needing a cloud provider or
        # --allocate-node-cidrs skip themselves; csr signing has no --cluster-signing-* and idles.
        "--controllers=*",
        f"--service-account-private-key-file={certs / 'sa.key'}", f"--root-ca-file={certs / 'ca.crt'}",
        "--use-service-account-credentials=false",
    ])  # fmt: skip
    scheduler_config = cp.workdir / "kube-scheduler.yaml"
    scheduler_config.write_text(
        "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
        f"clientConnection: {{kubeconfig: {json.dumps(kubeconfig)}}}\n"
        "leaderElection: {leaderElect: false}\n"
    )
    scheduler, scheduler_log = start_logged(cp.processes, cp.workdir, "kube-scheduler", [
        str(assets / "kube-scheduler"), f"--config={scheduler_config}", *delegated[1:],
        f"--secure-port={scheduler_port}", "--bind-address=127.0.0.1",
        f"--cert-dir={cp.workdir / 'scheduler-certs'}",
    ])  # fmt: skip
    _wait_http(f"https://127.0.0.1:{kcm_port}/healthz", start_timeout_s, kcm, cp.token, log=kcm_log)
    _wait_http(f"https://127.0.0.1:{scheduler_port}/readyz", start_timeout_s, scheduler, cp.token,
               log=scheduler_log)  # fmt: skip

    def default_service_account() -> bool:
        # The serviceaccount controller runs: pods, admitted only with their ServiceAccount, can be made.
        return bool(cp.request("GET", "/api/v1/namespaces/default/serviceaccounts/default"))

    try:
        wait_for(
            default_service_account, timeout=start_timeout_s, interval=0.2, what="default ServiceAccount"
        )
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; kube-controller-manager log tail:\n{_log_tail(kcm_log)}") from exc


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
