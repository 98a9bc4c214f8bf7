"""LeaderWorkerSet (sigs.k8s.io/lws) on the test control plane: its CRD, and its controller manager
with its webhooks served over TLS on 127.0.0.1.

In a cluster, LWS runs behind a Service and rotates its own webhook certificate, which the controller
waits for before it starts. Here the API server cannot reach a Service (no kube-proxy), so the
webhooks are registered with `clientConfig.url` https://127.0.0.1:<port>/<path> and a caBundle of a
throwaway CA, the controller serves a certificate that CA signed (webhook.certDir) and its own cert
rotation is off (internalCertManagement.enable: false). The pod webhook fails closed, as upstream
registers it, but only for pods that carry the LWS name label: other tests' pods never meet it.

hack/build-controlplane.sh builds the controller and copies the CRD into
$KVRELAY_CACHE/controlplane/lws-v<LWS_VERSION>/.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

from kvrelay_envtest import ControlPlane, start_logged, wait_for
from kvrelay_worker.ports import free_port

LWS_VERSION = "0.7.0"
CRD_NAME = "leaderworkersets.leaderworkerset.x-k8s.io"
WEBHOOK_NAME = "kvrelay-test-lws"
SET_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
# Paths the controller-runtime webhooks of LWS v0.7.0 serve (config/webhook/manifests.yaml).
MUTATE_LWS = "/mutate-leaderworkerset-x-k8s-io-v1-leaderworkerset"
VALIDATE_LWS = "/validate-leaderworkerset-x-k8s-io-v1-leaderworkerset"
MUTATE_POD = "/mutate--v1-pod"
VALIDATE_POD = "/validate--v1-pod"


def find_lws() -> tuple[Path | None, str]:
    """The cache dir holding lws-controller and leaderworkersets.yaml, or None and why not."""
    cache = Path(os.environ.get("KVRELAY_CACHE", Path.home() / ".cache" / "kvrelay"))
    path = cache / "controlplane" / f"lws-v{LWS_VERSION}"
    missing = [f for f in ("lws-controller", "leaderworkersets.yaml") if not (path / f).is_file()]
    if missing:
        return None, f"{path} lacks {', '.join(missing)} (hack/build-controlplane.sh builds them)"
    return path, ""


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {result.stderr[-2000:]}")


def _webhook_certs(certs: Path) -> bytes:
    """A CA and a serving cert for 127.0.0.1 signed by it, as controller-runtime reads them from its
    certDir (tls.crt, tls.key); returns the CA's PEM for the caBundle."""
    certs.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(certs / "ca.key"), "-out", str(certs / "ca.crt"),
             "-days", "7", "-subj", "/CN=kvrelay-test-lws-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    _openssl("req", *ec, "-keyout", str(certs / "tls.key"), "-out", str(certs / "tls.csr"),
             "-subj", "/CN=127.0.0.1")  # fmt: skip
    (certs / "tls.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n"
    )
    _openssl("x509", "-req", "-in", str(certs / "tls.csr"), "-CA", str(certs / "ca.crt"),
             "-CAkey", str(certs / "ca.key"), "-CAcreateserial", "-CAserial", str(certs / "ca.srl"),
             "-days", "7", "-extfile", str(certs / "tls.ext"), "-out", str(certs / "tls.crt"))  # fmt: skip
    return (certs / "ca.crt").read_bytes()


def _hook(name: str, port: int, path: str, ca: bytes, rule: dict[str, Any], pods: bool) -> dict[str, Any]:
    hook: dict[str, Any] = {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "clientConfig": {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(ca).decode()},
        "rules": [rule],
    }
    if pods:
        hook["objectSelector"] = {"matchExpressions": [{"key": SET_NAME_LABEL, "operator": "Exists"}]}
    return hook


def webhook_configurations(port: int, ca: bytes) -> list[dict[str, Any]]:
    """Mutating and validating webhook configurations pointing at the controller on 127.0.0.1:port."""
    lws_rule = {"apiGroups": ["leaderworkerset.x-k8s.io"], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["leaderworkersets"]}  # fmt: skip
    pod_create = {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
    pod_write = {**pod_create, "operations": ["CREATE", "UPDATE"]}
    meta = {"name": WEBHOOK_NAME}
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
         "metadata": meta, "webhooks": [
             _hook("mleaderworkerset.kb.io", port, MUTATE_LWS, ca, lws_rule, pods=False),
             _hook("mpod.kb.io", port, MUTATE_POD, ca, pod_create, pods=True)]},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
         "metadata": meta, "webhooks": [
             _hook("vleaderworkerset.kb.io", port, VALIDATE_LWS, ca, lws_rule, pods=False),
             _hook("vpod.kb.io", port, VALIDATE_POD, ca, pod_write, pods=True)]},
    ]  # fmt: skip


def start_lws_controller(cp: ControlPlane, lws_dir: Path, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """Starts the LWS controller manager against cp (stopped with it), registers its webhooks and
    returns once its webhook server answers TLS with the certificate the API server trusts."""
    workdir = cp.workdir / "lws"
    ca = _webhook_certs(workdir / "certs")
    port = free_port()
    config = workdir / "config.yaml"
    config.write_text(
        "apiVersion: config.lws.x-k8s.io/v1alpha1\nkind: Configuration\n"
        "leaderElection:\n  leaderElect: false\n"
        "internalCertManagement:\n  enable: false\n"
        f"webhook:\n  host: 127.0.0.1\n  port: {port}\n  certDir: {workdir / 'certs'}\n"
    )
    # controller-runtime reads KUBECONFIG; metrics and health endpoints off (nothing scrapes them here).
    proc, log = start_logged(cp.processes, cp.workdir, "lws-controller", [
        str(lws_dir / "lws-controller"), f"--config={config}",
        "--leader-elect=false", "--metrics-bind-address=0", "--health-probe-bind-address=0",
    ], env={**os.environ, "KUBECONFIG": str(cp.kubeconfig)})  # fmt: skip
    context = ssl.create_default_context(cafile=str(workdir / "certs" / "ca.crt"))

    def serving() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"lws-controller exited with {proc.returncode}; log:\n{log.read_text()[-4000:]}"
            )
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return True

    wait_for(serving, timeout=timeout_s, interval=0.2, what=f"lws-controller webhooks on :{port} (log {log})")
    for manifest in webhook_configurations(port, ca):
        plural = "mutatingwebhookconfigurations" if manifest["kind"].startswith("Mutating") else (
            "validatingwebhookconfigurations")  # fmt: skip
        cp.request("POST", f"/apis/admissionregistration.k8s.io/v1/{plural}", manifest)
    return proc
