"""The test-only node agent (tests/cluster) against a real kube-apiserver: pods run as local processes.

Pods are bound with spec.nodeName (no scheduler needed) and run in their own netns on a per-module
bridge; the test reaches them at their pod IPs. Needs root and `ip netns`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controlplane"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from kube_rest import Rest, not_found, pod_path
from kvrelay_envtest import ControlPlane, control_plane, find_assets
from node_agent import NodeAgentProcess, run_node_agent
from pod_env import expand
from pod_network import PodNetwork, netns_name, pod_network, unavailable_reason
from pod_probes import Prober

pytestmark = pytest.mark.e2e
NODE = "node-1"
MODEL_DST = "/models/tiny"
# A tiny HTTP server: /env, /cwd, /ls?path=, /read?path=, /fetch?url= (another pod); SIGTERM appends to
# $TERM_MARKER and exits, unless IGNORE_TERM=1.
SERVER = r"""
import json, os, signal, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def on_term(signum, frame):
    if os.environ.get("TERM_MARKER"):
        with open(os.environ["TERM_MARKER"], "a") as f:
            f.write("TERM\n")
    if os.environ.get("IGNORE_TERM") != "1":
        os._exit(0)

signal.signal(signal.SIGTERM, on_term)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/env":
            body = json.dumps(dict(os.environ))
        elif url.path == "/ls":
            body = json.dumps(sorted(os.listdir(q["path"])))
        elif url.path == "/cwd":
            body = os.getcwd()
        elif url.path == "/read":
            body = open(q["path"]).read()
        elif url.path == "/fetch":
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            body = opener.open(q["url"], timeout=5).read().decode()
        else:
            body = "ok"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


@dataclass
class Cluster:
    cp: ControlPlane
    network: PodNetwork
    agent: NodeAgentProcess
    rest: Rest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver, a pod bridge and one agent whose "image" has a model at /models/tiny."""
    if reason := unavailable_reason():
        pytest.skip(reason)
    assets, reason = find_assets()
    if assets is None:
        pytest.skip(reason)
    model_dir = tmp_path_factory.mktemp("image-model")
    (model_dir / "config.json").write_text("{}")
    logs = tmp_path_factory.mktemp("agent-logs")
    with control_plane(assets) as cp, pod_network() as network:
        binds = [(str(model_dir), MODEL_DST)]
        with run_node_agent(
            cp.kubeconfig, NODE, network=network, node_index=1, image_binds=binds, log_dir=logs,
            labels={"kvrelay.dev/test": "yes"}, capacity={"nvidia.com/gpu": "8"},
        ) as agent:  # fmt: skip
            yield Cluster(cp, network, agent, Rest(str(cp.kubeconfig)))


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace; its pods are force-deleted afterwards (no namespace controller runs)."""
    name = f"t-{secrets.token_hex(4)}"
    cluster.rest.post(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    yield name
    for pod in cluster.rest.get(f"/api/v1/namespaces/{name}/pods").get("items") or []:
        force_delete(cluster.rest, name, pod["metadata"]["name"])


def force_delete(rest: Rest, namespace: str, name: str) -> None:
    try:
        rest.delete(pod_path(namespace, name), {"gracePeriodSeconds": 0})
    except Exception as exc:
        if not not_found(exc):
            raise


def server_container(
    name: str = "web", env: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name, "image": "kvrelay-test-host", "command": ["python", "-c", SERVER],
        "env": env or [], "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 5},
        **extra,
    }  # fmt: skip


def create_pod(cluster: Cluster, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 30, **spec}}  # fmt: skip
    return cluster.rest.post(f"/api/v1/namespaces/{namespace}/pods", body)


def diagnostics(cluster: Cluster, namespace: str) -> str:
    """The pods' statuses, the agent's log and every container log of the namespace."""
    parts = [f"--- agent log:\n{cluster.agent.output(6000)}"]
    for pod in cluster.rest.get(f"/api/v1/namespaces/{namespace}/pods").get("items") or []:
        parts.append(f"--- pod {pod['metadata']['name']} status:\n{json.dumps(pod.get('status'), indent=1)}")
        for c in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]:
            log = cluster.agent.container_log(namespace, pod["metadata"]["name"], c["name"])
            parts.append(f"--- container {pod['metadata']['name']}/{c['name']} log:\n{log[-3000:]}")
    return "\n".join(parts)


def wait_pod(
    cluster: Cluster,
    namespace: str,
    name: str,
    check: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 30,
) -> dict[str, Any]:
    """Polls the pod until check(pod) holds; fails with the agent's and containers' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pod = cluster.rest.get(pod_path(namespace, name))
            if check(pod):
                return pod
        except Exception as exc:
            if not not_found(exc):
                raise
        time.sleep(0.1)
    pytest.fail(f"pod {namespace}/{name}: not {what} after {timeout}s\n{diagnostics(cluster, namespace)}")


def wait_gone(cluster: Cluster, namespace: str, name: str, timeout: float = 30) -> float:
    """Seconds until the pod object is gone from the API."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            cluster.rest.get(pod_path(namespace, name))
        except Exception as exc:
            if not_found(exc):
                return time.monotonic() - start
            raise
        time.sleep(0.1)
    pytest.fail(f"pod {namespace}/{name} still exists after {timeout}s\n{diagnostics(cluster, namespace)}")


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def get(ip: str, route: str, /, **query: str) -> str:
    """GET http://ip:8080/route?query from the test process."""
    url = f"http://{ip}:8080{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a host proxy
    with opener.open(url, timeout=10) as response:
        return response.read().decode()


def netns_exists(name: str) -> bool:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(line.split()[0] == name for line in listing.splitlines() if line.strip())


def test_expand_follows_the_kubelet_rules() -> None:
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)-$(C)-$$(A)-$", env) == "1-x-$(C)-$(A)-$"
    assert expand("$(A", env) == "$(A"


def test_capped_probe_period_keeps_the_failure_window() -> None:
    probe = Prober({"periodSeconds": 15, "failureThreshold": 4}, now=0.0, max_period_s=1.0, initial=True)
    assert (probe.interval, probe.failure_threshold) == (1.0, 60)
    for second in range(59):
        probe.record(False, "down", float(second))
    assert probe.result is True
    probe.record(False, "down", 59.0)
    assert probe.result is False


def test_node_registered_ready_with_lease(cluster: Cluster) -> None:
    node = cluster.rest.get(f"/api/v1/nodes/{NODE}")
    assert node["spec"]["podCIDR"] == cluster.network.node_cidr(1)
    assert node["metadata"]["labels"]["kvrelay.dev/test"] == "yes"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert {"type": "InternalIP", "address": cluster.network.gateway} in node["status"]["addresses"]
    lease = cluster.rest.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{NODE}")
    assert lease["spec"]["holderIdentity"] == NODE


def test_http_pod_ready_reachable_with_field_refs(cluster: Cluster, namespace: str) -> None:
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "GREETING", "value": "hello $(POD_NAME)"},
    ]
    startup = {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 30}
    container = server_container(env=env, startupProbe=startup, workingDir="/usr/share")
    create_pod(cluster, namespace, "web", containers=[container])
    pod = wait_pod(cluster, namespace, "web", is_ready, "Ready")
    status = pod["status"]
    ip = status["podIP"]
    assert status["phase"] == "Running"
    assert ip.startswith(cluster.network.node_cidr(1).rsplit(".", 1)[0] + ".")
    assert status["hostIP"] == cluster.network.gateway
    (container,) = status["containerStatuses"]
    assert container["ready"] and container["started"] and "running" in container["state"]
    served = json.loads(get(ip, "/env"))
    assert (served["POD_IP"], served["POD_NAME"], served["NODE"]) == (ip, "web", NODE)
    assert served["GREETING"] == "hello web"
    assert served["HOSTNAME"] == "web"
    assert get(ip, "/cwd") == "/usr/share"
    assert served["KUBERNETES_SERVICE_HOST"] and served["PATH"].startswith(str(Path(sys.executable).parent))


def test_two_pods_bind_the_same_port_and_reach_each_other(cluster: Cluster, namespace: str) -> None:
    for name in ("a", "b"):
        env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
        create_pod(cluster, namespace, name, containers=[server_container(env=env)])
    a, b = (wait_pod(cluster, namespace, n, is_ready, "Ready")["status"]["podIP"] for n in ("a", "b"))
    assert a != b
    from_a = json.loads(get(a, "/fetch", url=f"http://{b}:8080/env"))
    assert from_a["POD_NAME"] == "b"
    assert json.loads(get(b, "/env"))["POD_NAME"] == "b"


def test_init_container_then_volumes_at_their_paths_and_host_untouched(
    cluster: Cluster, namespace: str
) -> None:
    scratch = f"/kvrelay-test-{secrets.token_hex(3)}/scratch"
    before = {p: os.path.lexists(p) for p in ("/models", MODEL_DST, str(Path(scratch).parent))}
    mounts = [{"name": "scratch", "mountPath": scratch}]
    init = {"name": "prepare", "image": "kvrelay-test-host", "volumeMounts": mounts,
            "command": ["sh", "-c", f"sleep 1; date +%s.%N > {scratch}/init-done"]}  # fmt: skip
    main = server_container(
        volumeMounts=mounts,
        # The main container starts only after the init container's file exists.
        command=["sh", "-c", f'test -f {scratch}/init-done && exec python -c "$0"', SERVER],
    )
    create_pod(
        cluster, namespace, "vols", initContainers=[init], containers=[main],
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )  # fmt: skip
    pod = wait_pod(cluster, namespace, "vols", is_ready, "Ready")
    ip = pod["status"]["podIP"]
    (init_status,) = pod["status"]["initContainerStatuses"]
    assert init_status["state"]["terminated"]["exitCode"] == 0
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    assert json.loads(get(ip, "/ls", path=scratch)) == ["init-done"]
    assert json.loads(get(ip, "/ls", path=MODEL_DST)) == ["config.json"]
    assert get(ip, "/read", path="/etc/hosts").strip().endswith(f"{ip}\tvols")
    assert {p: os.path.lexists(p) for p in before} == before, "a mount point was created on the host"


def test_a_volume_hides_the_image_content_under_it(cluster: Cluster, namespace: str) -> None:
    # As in a real runtime: an emptyDir at /models shades the image's /models/tiny.
    mounts = [{"name": "models", "mountPath": "/models"}]
    container = server_container(volumeMounts=mounts)
    create_pod(
        cluster, namespace, "shade", containers=[container], volumes=[{"name": "models", "emptyDir": {}}]
    )
    ip = wait_pod(cluster, namespace, "shade", is_ready, "Ready")["status"]["podIP"]
    assert json.loads(get(ip, "/ls", path="/models")) == []


def test_secret_and_config_map_volumes_and_env(cluster: Cluster, namespace: str) -> None:
    rest = cluster.rest
    rest.post(f"/api/v1/namespaces/{namespace}/secrets",
              {"metadata": {"name": "s"}, "stringData": {"token": "s3cret", "other": "x"}})  # fmt: skip
    rest.post(
        f"/api/v1/namespaces/{namespace}/configmaps", {"metadata": {"name": "c"}, "data": {"mode": "fast"}}
    )
    env = [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "mode"}}},
           {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}]  # fmt: skip
    mounts = [{"name": "s", "mountPath": "/etc/kvrelay/secret", "readOnly": True},
              {"name": "info", "mountPath": "/etc/podinfo"}]  # fmt: skip
    volumes = [
        {"name": "s", "secret": {"secretName": "s", "items": [{"key": "token", "path": "api-key"}]}},
        {
            "name": "info",
            "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]},
        },
    ]
    create_pod(
        cluster,
        namespace,
        "cfg",
        containers=[server_container(env=env, volumeMounts=mounts)],
        volumes=volumes,
    )
    ip = wait_pod(cluster, namespace, "cfg", is_ready, "Ready")["status"]["podIP"]
    served = json.loads(get(ip, "/env"))
    assert (served["MODE"], served["TOKEN"]) == ("fast", "s3cret")
    assert json.loads(get(ip, "/ls", path="/etc/kvrelay/secret")) == ["api-key"]
    assert get(ip, "/read", path="/etc/kvrelay/secret/api-key") == "s3cret"
    assert get(ip, "/read", path="/etc/podinfo/name") == "cfg"


def test_delete_sends_sigterm_and_the_pod_disappears(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    env = [{"name": "TERM_MARKER", "value": "/marker/terminated"}]
    mounts = [{"name": "marker", "mountPath": "/marker"}]
    container = server_container(env=env, volumeMounts=mounts)
    volumes = [{"name": "marker", "hostPath": {"path": str(tmp_path), "type": "Directory"}}]
    create_pod(cluster, namespace, "term", containers=[container], volumes=volumes)
    ip = wait_pod(cluster, namespace, "term", is_ready, "Ready")["status"]["podIP"]
    cluster.rest.delete(pod_path(namespace, "term"))  # the pod's grace: 30 s
    elapsed = wait_gone(cluster, namespace, "term")
    assert elapsed < 10, "the process exited on SIGTERM; the agent should not have waited the whole grace"
    assert (tmp_path / "terminated").read_text() == "TERM\n"
    assert not netns_exists(netns_name(cluster.network.bridge, ip))


def test_sigterm_ignored_is_sigkilled_after_the_grace_period(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    env = [{"name": "TERM_MARKER", "value": "/marker/terminated"}, {"name": "IGNORE_TERM", "value": "1"}]
    mounts = [{"name": "marker", "mountPath": "/marker"}]
    volumes = [{"name": "marker", "hostPath": {"path": str(tmp_path)}}]
    create_pod(cluster, namespace, "stubborn", containers=[server_container(env=env, volumeMounts=mounts)],
               volumes=volumes)  # fmt: skip
    ip = wait_pod(cluster, namespace, "stubborn", is_ready, "Ready")["status"]["podIP"]
    cluster.rest.delete(pod_path(namespace, "stubborn"), {"gracePeriodSeconds": 2})
    elapsed = wait_gone(cluster, namespace, "stubborn")
    assert 1.5 <= elapsed < 8, elapsed
    assert (tmp_path / "terminated").read_text() == "TERM\n"
    assert not netns_exists(netns_name(cluster.network.bridge, ip))


def test_force_delete_kills_at_once(cluster: Cluster, namespace: str) -> None:
    container = server_container(env=[{"name": "IGNORE_TERM", "value": "1"}])
    create_pod(cluster, namespace, "forced", containers=[container])
    ip = wait_pod(cluster, namespace, "forced", is_ready, "Ready")["status"]["podIP"]
    force_delete(cluster.rest, namespace, "forced")
    deadline = time.monotonic() + 10
    while netns_exists(netns_name(cluster.network.bridge, ip)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not netns_exists(netns_name(cluster.network.bridge, ip)), diagnostics(cluster, namespace)


def test_failing_container_is_reported_and_restarted(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    mounts = [{"name": "state", "mountPath": "/state"}]
    container = {"name": "crash", "image": "kvrelay-test-host", "volumeMounts": mounts,
                 "command": ["sh", "-c", "echo run >> /state/runs; exit 3"]}  # fmt: skip
    volumes = [{"name": "state", "hostPath": {"path": str(tmp_path)}}]
    create_pod(cluster, namespace, "crash", containers=[container], volumes=volumes)

    def restarted_after_exit_3(pod: dict[str, Any]) -> bool:
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        status = statuses[0]
        terminated = (status.get("lastState") or {}).get("terminated") or (status.get("state") or {}).get(
            "terminated"
        )
        return status.get("restartCount", 0) >= 1 and bool(terminated) and terminated["exitCode"] == 3

    pod = wait_pod(cluster, namespace, "crash", restarted_after_exit_3, "restarted after exit code 3")
    assert pod["status"]["phase"] == "Running"
    # restartCount counts the restart when it is decided; the second run follows at once.
    deadline = time.monotonic() + 10
    while (tmp_path / "runs").read_text().count("run") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "runs").read_text().count("run") >= 2, diagnostics(cluster, namespace)


def test_exec_probes_and_liveness_restart(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    mounts = [{"name": "ctl", "mountPath": "/ctl"}]
    container = server_container(
        volumeMounts=mounts,
        readinessProbe={"exec": {"command": ["test", "-f", "/ctl/ready"]}, "periodSeconds": 1},
        livenessProbe={"exec": {"command": ["sh", "-c", "! test -f /ctl/dead"]}, "periodSeconds": 1,
                       "failureThreshold": 2},
    )  # fmt: skip
    create_pod(cluster, namespace, "probed", containers=[container], terminationGracePeriodSeconds=1,
               volumes=[{"name": "ctl", "hostPath": {"path": str(tmp_path)}}])  # fmt: skip
    wait_pod(cluster, namespace, "probed", lambda p: "podIP" in p.get("status", {}), "given an IP")
    time.sleep(2)
    assert not is_ready(cluster.rest.get(pod_path(namespace, "probed")))
    (tmp_path / "ready").touch()
    wait_pod(cluster, namespace, "probed", is_ready, "Ready")
    (tmp_path / "dead").touch()

    def restarted(pod: dict[str, Any]) -> bool:
        return ((pod.get("status") or {}).get("containerStatuses") or [{}])[0].get("restartCount", 0) >= 1

    wait_pod(cluster, namespace, "probed", restarted, "restarted by its liveness probe")
    (tmp_path / "dead").unlink()
    wait_pod(cluster, namespace, "probed", is_ready, "Ready again")


def test_agent_shutdown_kills_pods_and_removes_their_netns(cluster: Cluster, tmp_path: Path) -> None:
    name = f"t-{secrets.token_hex(4)}"
    cluster.rest.post(
        "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    with run_node_agent(cluster.cp.kubeconfig, "node-2", network=cluster.network, node_index=2,
                        log_dir=tmp_path) as agent:  # fmt: skip
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"nodeName": "node-2", "containers": [server_container()]}}  # fmt: skip
        cluster.rest.post(f"/api/v1/namespaces/{name}/pods", body)
        deadline = time.monotonic() + 30
        while not is_ready(cluster.rest.get(pod_path(name, "p"))):
            assert time.monotonic() < deadline, agent.output()
            time.sleep(0.1)
        ip = cluster.rest.get(pod_path(name, "p"))["status"]["podIP"]
        assert get(ip, "/") == "ok"
    assert agent.process.returncode == 0, agent.output()
    assert not netns_exists(netns_name(cluster.network.bridge, ip))
    force_delete(cluster.rest, name, "p")


# --- with kube-controller-manager and kube-scheduler: the apiserver listens on the bridge ----------

WHOAMI = r"""
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
request = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
    data=json.dumps(review).encode(),
    headers={"Authorization": "Bearer " + open(f"{sa}/token").read(), "Content-Type": "application/json"},
)
context = ssl.create_default_context(cafile=f"{sa}/ca.crt")
user = json.load(urllib.request.urlopen(request, context=context, timeout=10))["status"]["userInfo"]
print(json.dumps({"user": user, "namespace": open(f"{sa}/namespace").read()}))
"""


@pytest.fixture(scope="module")
def full_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A bridge, then a control plane with controllers bound to its address, then one agent."""
    if reason := unavailable_reason():
        pytest.skip(reason)
    assets, reason = find_assets(controllers=True)
    if assets is None:
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("full-agent-logs")
    with (
        pod_network() as network,
        control_plane(assets, controllers=True, bind_address=network.gateway) as cp,
        run_node_agent(cp.kubeconfig, NODE, network=network, node_index=1, log_dir=logs) as agent,
    ):
        yield Cluster(cp, network, agent, Rest(str(cp.kubeconfig)))


def test_scheduled_job_pod_calls_the_api_with_its_bound_token(full_cluster: Cluster) -> None:
    cluster, ns = full_cluster, "default"
    container = {"name": "whoami", "image": "kvrelay-test-host", "command": ["python", "-c", WHOAMI]}
    pod_spec = {"restartPolicy": "Never", "containers": [container]}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "whoami"},
        "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}},
    }
    cluster.rest.post(f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    deadline = time.monotonic() + 60
    while True:
        status = cluster.rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs/whoami").get("status") or {}
        if status.get("succeeded") or status.get("failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status.get("succeeded") == 1, f"{status}\n{diagnostics(cluster, ns)}"
    (pod,) = cluster.rest.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="job-name=whoami")["items"]
    assert pod["spec"]["nodeName"] == NODE  # placed by the scheduler
    out = json.loads(cluster.agent.container_log(ns, pod["metadata"]["name"], "whoami"))
    assert out["user"]["username"] == "system:serviceaccount:default:default"
    assert out["user"]["extra"]["authentication.kubernetes.io/pod-name"] == [pod["metadata"]["name"]]
    assert out["namespace"] == ns
    cluster.rest.delete(f"/apis/batch/v1/namespaces/{ns}/jobs/whoami", {"propagationPolicy": "Background"})


def test_deployment_pods_are_reached_through_their_endpoint_slice(full_cluster: Cluster) -> None:
    cluster, ns = full_cluster, "default"
    labels = {"app": "web"}
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    pod_spec = {"terminationGracePeriodSeconds": 5, "containers": [server_container(env=env)]}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    ports = [{"name": "http", "port": 80, "targetPort": "http"}]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": labels, "ports": ports},
    }
    cluster.rest.post(f"/apis/apps/v1/namespaces/{ns}/deployments", deployment)
    cluster.rest.post(f"/api/v1/namespaces/{ns}/services", service)

    def ready_addresses() -> list[str]:
        slices = cluster.rest.get(
            f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
            labelSelector="kubernetes.io/service-name=web",
        )["items"]
        return sorted(
            address
            for s in slices
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for address in e["addresses"]
        )

    deadline = time.monotonic() + 60
    while len(addresses := ready_addresses()) < 2:
        assert time.monotonic() < deadline, f"{addresses}\n{diagnostics(cluster, ns)}"
        time.sleep(0.2)
    names = {json.loads(get(address, "/env"))["POD_NAME"] for address in addresses}
    assert len(names) == 2 and all(n.startswith("web-") for n in names)
    cluster.rest.delete(f"/apis/apps/v1/namespaces/{ns}/deployments/web", {"propagationPolicy": "Foreground"})
    cluster.rest.delete(f"/api/v1/namespaces/{ns}/services/web")
    deadline = time.monotonic() + 60
    while cluster.rest.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="app=web")["items"]:
        assert time.monotonic() < deadline, diagnostics(cluster, ns)
        time.sleep(0.2)


def test_claim_bound_to_a_host_path_volume_is_mounted(full_cluster: Cluster, tmp_path: Path) -> None:
    cluster, ns = full_cluster, "default"
    (tmp_path / "weights.bin").write_text("w")
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pv-{secrets.token_hex(4)}"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "hostPath": {"path": str(tmp_path)},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models"},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": pv["metadata"]["name"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    cluster.rest.post("/api/v1/persistentvolumes", pv)
    cluster.rest.post(f"/api/v1/namespaces/{ns}/persistentvolumeclaims", pvc)
    mounts = [{"name": "model", "mountPath": "/models"}]
    volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "claim"},
        "spec": {"containers": [server_container(volumeMounts=mounts)], "volumes": volumes},
    }
    cluster.rest.post(f"/api/v1/namespaces/{ns}/pods", body)
    ip = wait_pod(cluster, ns, "claim", is_ready, "Ready", timeout=60)["status"]["podIP"]
    assert get(ip, "/read", path="/models/weights.bin") == "w"
    cluster.rest.delete(pod_path(ns, "claim"), {"gracePeriodSeconds": 1})
    wait_gone(cluster, ns, "claim")
    cluster.rest.delete(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/models")
