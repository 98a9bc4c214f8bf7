"""The cluster path, end to end, on one machine: `helm install`, a DisaggregatedModel, real workers.

A real kube-apiserver, kube-controller-manager and kube-scheduler; three nodes owned by the test node
agent (tests/cluster), each pod a local process in its own network namespace. The chart's operator
runs as a pod with the chart's ServiceAccount; the tiny model's prefill and decode pods land on
their GPU pools and run `kvrelay-worker`; the router finds them through EndpointSlices; an
`openai` client request to the router's Service endpoint returns the tokens `kvrelay serve` returns.
Then decode scales from 1 to 2 and the second real worker takes requests.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvrelay_worker.model_store import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "controlplane"), str(ROOT / "tests" / "cluster")]
from kvrelay_envtest import ControlPlane, cluster_tools_or_skip, control_plane, wait_for  # noqa: E402
from node_agent import NodeAgentProcess, run_node_agent  # noqa: E402
from pod_network import pod_network, unavailable_reason  # noqa: E402
from serve_helpers import run_serve  # noqa: E402
from worker_fixtures import metric_value  # noqa: E402

pytestmark = pytest.mark.e2e

CHART = ROOT / "charts" / "kvrelay"
RELEASE, RELEASE_NS, MODEL_NS, MODEL = "kvrelay", "kvrelay-system", "models", "tiny"
POOL = "kvrelay.dev/node-pool"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# Deterministic requests (temperature 0): the same tokens from `kvrelay serve` and from the cluster.
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Kubernetes schedules"]
MAX_TOKENS = 12


@dataclass
class Cluster:
    """The running cluster: its control plane, tools and node agents."""

    plane: ControlPlane
    kubectl: Path
    helm: Path
    agents: dict[str, NodeAgentProcess]

    def k(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """kubectl as the cluster admin."""
        done = subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.plane.kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr}{self.logs()}")
        return done

    def get(self, *args: str) -> dict[str, Any]:
        """`kubectl get ... -o json`, parsed."""
        return json.loads(self.k("get", *args, "-o", "json").stdout)

    def logs(self, tail: int = 3000) -> str:
        """The agents' logs and every container's log (the end of each), for failure messages."""
        out = []
        for agent in self.agents.values():
            out.append(f"\n--- agent {agent.node}\n{agent.output(tail)}")
            for path in sorted(agent.log_dir.glob("*.log")):
                if not path.name.startswith("agent-"):
                    out.append(f"\n--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "".join(out)


def _completions(base_url: str, model: str) -> list[tuple[str, int, str]]:
    """(text, completion tokens, finish reason) of each prompt, with the official openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)
    out = []
    for prompt in PROMPTS:
        done = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        choice = done.choices[0]
        assert done.usage is not None
        out.append((choice.text, done.usage.completion_tokens, choice.finish_reason))
    return out


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int, str]]:
    """What `kvrelay serve --model tiny` answers (run before the cluster starts, not beside it)."""
    with run_serve(
        ["--model", "tiny", "--prefill", "1", "--decode", "1"], tmp_path_factory.mktemp("ref")
    ) as s:
        answers = _completions(s.base_url, s.model)
    assert all(tokens > 0 for _, tokens, _ in answers), answers
    return answers


@pytest.fixture(scope="module")
def cluster(
    reference: list[Any], tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    assets, kubectl, helm = cluster_tools_or_skip(controllers=True)
    if why := unavailable_reason():
        pytest.skip(f"no pod network: {why}")
    logs = tmp_path_factory.mktemp("agents")
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(pod_network())
        plane = stack.enter_context(control_plane(assets, controllers=True, bind_address=network.gateway))
        nodes = {
            # name: (index, pool, taints, extra capacity)
            "system-0": (1, "system", [], {}),
            "prefill-0": (2, "prefill-h100", [GPU_TAINT], {"nvidia.com/gpu": "8", "rdma/ib": "8"}),
            "decode-0": (3, "decode-l40s", [GPU_TAINT], {"nvidia.com/gpu": "4", "rdma/ib": "8"}),
        }
        agents = {}
        for name, (index, pool, taints, gpus) in nodes.items():
            agents[name] = stack.enter_context(
                run_node_agent(
                    plane.kubeconfig, name, network=network, node_index=index, labels={POOL: pool},
                    taints=taints, capacity={"cpu": "16", "memory": "64Gi", "pods": "110", **gpus},
                    image_binds=[(str(tiny_dir), "/models/tiny")], log_dir=logs / name,
                )
            )  # fmt: skip
        yield Cluster(plane, kubectl, helm, agents)


def _ready_endpoints(cluster: Cluster, service: str, port_name: str) -> list[str]:
    """host:port of the ready endpoints of a Service, from its EndpointSlices (what kube-proxy reads)."""
    slices = cluster.get("endpointslices", "-n", MODEL_NS, "-l", f"kubernetes.io/service-name={service}")
    out = []
    for item in slices["items"]:
        port = next((p["port"] for p in item.get("ports") or [] if p.get("name") == port_name), None)
        for endpoint in item.get("endpoints") or []:
            if port is not None and (endpoint.get("conditions") or {}).get("ready") is not False:
                out += [f"{address}:{port}" for address in endpoint["addresses"]]
    return sorted(out)


def _model_status(cluster: Cluster) -> dict[str, Any]:
    return cluster.get("disaggregatedmodel", MODEL, "-n", MODEL_NS).get("status") or {}


def _pods(cluster: Cluster, role: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={MODEL},kvrelay.dev/role={role}"
    return cluster.get("pods", "-n", MODEL_NS, "-l", selector)["items"]


@pytest.fixture(scope="module")
def served(cluster: Cluster) -> Cluster:
    """The chart installed (its operator running as a pod) and the tiny model Ready."""
    install = [
        str(cluster.helm), "install", RELEASE, str(CHART), f"--kubeconfig={cluster.plane.kubeconfig}",
        "--namespace", RELEASE_NS, "--create-namespace", "--set", "image.repository=kvrelay/kvrelay",
        "--set", "image.tag=test", "--set", "operator.replicaCount=1",
        # Real pods run here: helm waits for the operator's Deployment to be Ready.
        "--wait", "--timeout=180s",
    ]  # fmt: skip
    done = subprocess.run(install, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr + done.stdout + cluster.logs()
    cluster.k("create", "namespace", MODEL_NS)
    spec = {
        "model": {"source": "/models/tiny", "maxModelLen": 512, "dtype": "float32"},
        "kvTransfer": {"backend": "tcp", "transport": "tcp"},
    }
    toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for role, pool in (("prefill", "prefill-h100"), ("decode", "decode-l40s")):
        spec[role] = {
            "replicas": 1, "nodeSelector": {POOL: pool}, "tolerations": toleration,
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        }  # fmt: skip
    model = {"apiVersion": "kvrelay.dev/v1alpha1", "kind": "DisaggregatedModel",
             "metadata": {"name": MODEL, "namespace": MODEL_NS}, "spec": spec}  # fmt: skip
    cluster.k("apply", "-f", "-", stdin=yaml.safe_dump(model))
    wait_for(
        lambda: _model_status(cluster).get("phase") == "Ready", timeout=300, interval=1,
        what=f"model Ready; status {_model_status(cluster)}{cluster.logs()}",
    )  # fmt: skip
    return cluster


def test_the_operator_runs_as_the_charts_pod(served: Cluster) -> None:
    (pod,) = served.get("pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/component=operator")["items"]
    assert pod["spec"]["serviceAccountName"] == "kvrelay-operator"
    assert pod["spec"]["nodeName"] == "system-0"
    assert pod["status"]["phase"] == "Running"
    # It reconciled the model with that account: the children carry its field manager.
    deploy = served.get("deployment", f"{MODEL}-decode", "-n", MODEL_NS, "--show-managed-fields")
    managers = {m["manager"] for m in deploy["metadata"]["managedFields"]}
    assert "kvrelay-operator" in managers


def test_workers_land_on_their_pools_and_run(served: Cluster) -> None:
    for role, node in (("prefill", "prefill-0"), ("decode", "decode-0"), ("router", "system-0")):
        (pod,) = _pods(served, role)
        assert pod["spec"]["nodeName"] == node, role
        assert pod["status"]["podIP"].startswith(served.plane.host.rsplit(".", 2)[0]), pod["status"]
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True", (role, pod["status"])
    status = _model_status(served)
    assert [status[r]["readyReplicas"] for r in ("prefill", "decode", "router")] == [1, 1, 1]
    assert {c["type"]: c["status"] for c in status["conditions"]}["PodsScheduled"] == "True"
    # The router found both workers through their EndpointSlices.
    assert len(_ready_endpoints(served, f"{MODEL}-prefill", "grpc")) == 1
    assert len(_ready_endpoints(served, f"{MODEL}-decode", "grpc")) == 1


def _router_url(cluster: Cluster) -> str:
    (endpoint,) = _ready_endpoints(cluster, f"{MODEL}-router", "http")
    return f"http://{endpoint}/v1"


def test_openai_through_the_router_matches_kvrelay_serve(served: Cluster, reference: list[Any]) -> None:
    assert _completions(_router_url(served), MODEL) == reference


def _decode_tokens(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return metric_value(text, "kvrelay_generation_tokens_total", role="decode") or 0.0


def test_scaling_decode_starts_a_second_worker_that_takes_requests(
    served: Cluster, reference: list[Any]
) -> None:
    before = {p["metadata"]["name"] for p in _pods(served, "decode")}
    served.k("patch", "disaggregatedmodel", MODEL, "-n", MODEL_NS, "--type=merge",
             "-p", json.dumps({"spec": {"decode": {"replicas": 2}}}))  # fmt: skip
    wait_for(
        lambda: len(_ready_endpoints(served, f"{MODEL}-decode", "grpc")) == 2, timeout=240, interval=1,
        what=f"a second ready decode endpoint{served.logs()}",
    )  # fmt: skip
    (new,) = [p for p in _pods(served, "decode") if p["metadata"]["name"] not in before]
    assert new["spec"]["nodeName"] == "decode-0"
    metrics = f"{new['status']['podIP']}:9090"
    assert _decode_tokens(metrics) == 0.0
    # The router's discovery follows the EndpointSlice; requests then alternate between idle workers.
    wait_for(
        lambda: _model_status(served).get("decode", {}).get("readyReplicas") == 2, timeout=60,
        what="model status decode 2/2 ready",
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while _decode_tokens(metrics) == 0.0:
        assert _completions(_router_url(served), MODEL) == reference  # token-exact on either worker
        if time.monotonic() > deadline:
            health = urllib.request.urlopen(_router_url(served).removesuffix("/v1") + "/health", timeout=10)
            pytest.fail(f"the new decode worker took no request; router: {health.read()!r}{served.logs()}")
    assert _decode_tokens(metrics) > 0
