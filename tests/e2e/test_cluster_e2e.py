"""The cluster path, end to end, on one machine: `helm install`, a DisaggregatedModel, real workers.

A real kube-apiserver, kube-controller-manager and kube-scheduler; three nodes owned by the test node
agent (tests/cluster), each pod a local process in its own network namespace. The chart's operator
runs as a pod with the chart's ServiceAccount; the tiny model's prefill and decode pods land on
their GPU pools and run `kvrelay-worker`; the router finds them through EndpointSlices; an
`openai` client request to the router's Service endpoint returns the tokens `kvrelay serve` returns.
Then decode scales from 1 to 2 and the second real worker takes requests, the autoscaler lowers it again
under load, and last both pools scale to zero and back for a request the router holds (issue 18).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
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
from prometheus_fixtures import query, run_prometheus  # noqa: E402
from serve_helpers import run_serve  # noqa: E402
from worker_fixtures import metric_value  # noqa: E402

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

pytestmark = pytest.mark.e2e

CHART = ROOT / "charts" / "kvrelay"
RELEASE, RELEASE_NS, MODEL_NS, MODEL = "kvrelay", "kvrelay-system", "models", "tiny"
POOL = "kvrelay.dev/node-pool"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# Deterministic requests (temperature 0): the same tokens from `kvrelay serve` and from the cluster.
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Kubernetes schedules"]
MAX_TOKENS = 12
LONG_TOKENS = 96


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


def _stream_text(client: Any, prompt: str) -> str:
    """One greedy streamed completion of LONG_TOKENS tokens (long enough to be mid-stream at a scale-down)."""
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=LONG_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


@dataclass
class References:
    """What `kvrelay serve --model tiny` answers: PROMPTS short, and streamed LONG_TOKENS long."""

    short: list[tuple[str, int, str]]
    long: dict[str, str]


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> References:
    """Run before the cluster starts, not beside it."""
    from openai import OpenAI

    args = ["--model", "tiny", "--prefill", "1", "--decode", "1", "--served-model-name", MODEL]
    with run_serve(args, tmp_path_factory.mktemp("ref")) as s:
        answers = _completions(s.base_url, s.model)
        client = OpenAI(base_url=s.base_url, api_key="unused", timeout=120, max_retries=0)
        long = {prompt: _stream_text(client, prompt) for prompt in PROMPTS}
    assert all(tokens > 0 for _, tokens, _ in answers), answers
    return References(answers, long)


@pytest.fixture(scope="module")
def cluster(
    reference: References, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
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
        # The test's Prometheus scrapes every second: the autoscaler's rate window follows (10 s).
        "monitoring": {"interval": "1s"},
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


def test_openai_through_the_router_matches_kvrelay_serve(served: Cluster, reference: References) -> None:
    assert _completions(_router_url(served), MODEL) == reference.short


def _decode_tokens(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return metric_value(text, "kvrelay_generation_tokens_total", role="decode") or 0.0


def test_scaling_decode_starts_a_second_worker_that_takes_requests(
    served: Cluster, reference: References
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
        assert _completions(_router_url(served), MODEL) == reference.short  # token-exact on either worker
        if time.monotonic() > deadline:
            health = urllib.request.urlopen(_router_url(served).removesuffix("/v1") + "/health", timeout=10)
            pytest.fail(f"the new decode worker took no request; router: {health.read()!r}{served.logs()}")
    assert _decode_tokens(metrics) > 0


class StreamingLoad:
    """Greedy streams through the router from a few threads until stopped; every text is checked
    against `kvrelay serve`'s, and every error is kept."""

    def __init__(self, base_url: str, expected: dict[str, str], concurrency: int = 4) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)
        self.expected = expected
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)
        ]

    def _run(self, worker: int) -> None:
        prompts = list(self.expected)
        i = worker
        while not self.stop.is_set():
            prompt = prompts[i % len(prompts)]
            try:
                text = _stream_text(self.client, prompt)
            except Exception as exc:  # every failure is the test's to report
                cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
                self.failures.append(
                    f"{time.strftime('%H:%M:%S')} {prompt!r}: {type(exc).__name__}: {exc}{cause}"
                )
                continue
            if text != self.expected[prompt]:
                self.failures.append(f"{prompt!r}: {text!r} != {self.expected[prompt]!r}")
            self.done += 1
            i += 1

    def __enter__(self) -> StreamingLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)


def _pod_targets(plane: ControlPlane) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery for the model's pods, selected as the PodMonitor the operator
    renders selects them (the model's labels; container ports `metrics` and `http`)."""
    selector = urllib.parse.quote(f"app.kubernetes.io/name=kvrelay,app.kubernetes.io/instance={MODEL}")
    pods = json.loads(plane.get(f"/api/v1/namespaces/{MODEL_NS}/pods?labelSelector={selector}"))["items"]
    groups = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports") or []]
        targets = [f"{ip}:{p['containerPort']}" for p in ports if p.get("name") in ("metrics", "http")]
        if ip and targets:
            groups.append({"targets": targets, "labels": {"pod": pod["metadata"]["name"]}})
    return groups


class _TargetsHandler(http.server.BaseHTTPRequestHandler):
    plane: ControlPlane

    def do_GET(self) -> None:
        body = json.dumps(_pod_targets(self.plane)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def prometheus(served: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on the host that finds the model's pods through the API server.

    Debian's Prometheus is built without kubernetes_sd_configs, so a small HTTP service discovery
    endpoint reads the pods from the API server on each refresh instead.
    """
    handler = type("Targets", (_TargetsHandler,), {"plane": served.plane})
    discovery = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=discovery.serve_forever, daemon=True).start()
    pods = {
        "job_name": "kvrelay-pods",
        "http_sd_configs": [
            {"url": f"http://127.0.0.1:{discovery.server_address[1]}/targets", "refresh_interval": "2s"}
        ],
    }
    try:
        # On the pod network's gateway, so the operator's pod reaches it.
        with run_prometheus(
            tmp_path_factory.mktemp("prometheus"), {}, scrape_configs=[pods], host=served.plane.host
        ) as url:
            yield url
    finally:
        discovery.shutdown()


def _decode_pods_now(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in _pods(cluster, "decode")}


def test_autoscaler_lowers_decode_under_load_and_the_least_loaded_pod_goes(
    served: Cluster, reference: References, prometheus: str
) -> None:
    """Decode at 2 (the test above), autoscaling turned on with a profile that needs 1: while greedy
    streams run, the operator marks both pods' deletion costs from their live loads, lowers decode to 1,
    the ReplicaSet controller removes the lowest-cost pod, that worker drains and exits 0, and no
    request fails or changes its text."""
    pods = _decode_pods_now(served)
    assert len(pods) == 2 and not any(p["metadata"].get("deletionTimestamp") for p in pods.values())
    wait_for(
        lambda: len(query(prometheus, f'up{{pod=~"{MODEL}-.*"}} == 1')) >= 4, timeout=60, interval=1,
        what=f"Prometheus scraping the router and 3 workers: {query(prometheus, 'up')}",
    )  # fmt: skip
    autoscaling = {
        "mode": "auto", "prometheusUrl": prometheus, "intervalSeconds": 5,
        "scaleUpCooldownSeconds": 0, "scaleDownCooldownSeconds": 5,
        # Generous SLOs and a profile far above what this load needs: the policy wants 1 of each.
        "slo": {"ttftSeconds": 60, "itlSeconds": 10},
        "profile": {"prefillTokensPerSecond": 100000, "decodeTokensPerSecond": 100000},
    }  # fmt: skip
    patch = {
        "spec": {
            "autoscaling": autoscaling,
            "prefill": {"minReplicas": 1, "maxReplicas": 1},
            "decode": {"minReplicas": 1, "maxReplicas": 2},
        }
    }
    costs_seen: dict[str, str] = {}
    with StreamingLoad(_router_url(served), reference.long) as load:
        # A steady load before the autoscaler looks: rates over its 10 s window have stopped rising
        # (a rising demand holds a scale-down).
        time.sleep(12)
        served.k(
            "patch", "disaggregatedmodel", MODEL, "-n", MODEL_NS, "--type=merge", "-p", json.dumps(patch)
        )
        deadline = time.monotonic() + 180
        while True:
            now = _decode_pods_now(served)
            for name, pod in now.items():
                if cost := (pod["metadata"].get("annotations") or {}).get(DELETION_COST):
                    costs_seen[name] = cost
            leaving = [n for n, p in now.items() if p["metadata"].get("deletionTimestamp")]
            if leaving or set(now) < set(pods):
                break
            assert time.monotonic() < deadline, (
                f"decode never scaled down; status {_model_status(served)}{served.logs()}"
            )
            time.sleep(0.2)
        (victim,) = leaving or set(pods) - set(now)
        assert load.done > 0 and not load.failures, f"{load.failures[:3]}{served.logs()}"
        # Keep the load on while the victim drains, until its pod is gone from the API.
        wait_for(lambda: victim not in _decode_pods_now(served), timeout=150, interval=0.5,
                 what=f"pod {victim} gone after its drain{served.logs()}")  # fmt: skip
        done_at_removal = load.done
        time.sleep(2)
    assert not load.failures, f"{load.failures[:5]}{served.logs()}"
    assert load.done > done_at_removal, "requests stopped being served after the scale-down"
    assert set(costs_seen) == set(pods), f"deletion costs set on {costs_seen}, pods {set(pods)}"
    assert costs_seen[victim] == min(costs_seen.values(), key=int), (victim, costs_seen)
    status = _model_status(served)
    assert status["decode"]["desiredReplicas"] == 1 and status["autoscaler"]["reason"], status
    events = served.get("events", "-n", MODEL_NS, "--field-selector", "reason=Scaled")["items"]
    assert any(f"least loaded first: {victim}" in e["message"] for e in events), [
        e["message"] for e in events
    ]
    # The node agent ran the victim's worker: it drained (finished its streams) and exited 0, not killed.
    agent = served.agents["decode-0"].output(200000)
    exits = re.findall(rf"container {MODEL_NS}/{victim}/\S+ exited with (-?\d+)", agent)
    assert exits == ["0"], exits
    print(json.dumps({"requests": load.done, "victim": victim, "deletion_costs": costs_seen}))


# ---------------------------------------------------------------- scale to zero (issue 18)


def _patch_model(cluster: Cluster, spec: dict[str, Any]) -> None:
    cluster.k(
        "patch", "disaggregatedmodel", MODEL, "-n", MODEL_NS, "--type=merge", "-p", json.dumps({"spec": spec})
    )


def _live_pods(cluster: Cluster, role: str) -> list[dict[str, Any]]:
    return [p for p in _pods(cluster, role) if not p["metadata"].get("deletionTimestamp")]


def _router_rolled(cluster: Cluster, old: set[str], flag: str, value: str) -> str | None:
    """The router's base URL once its Deployment replaced the pods in `old` with one running `flag value`
    (a router spec change rolls the router) and only that pod is its Service's endpoint."""
    pods = _pods(cluster, "router")
    if len(pods) != 1 or pods[0]["metadata"]["name"] in old:
        return None
    args = pods[0]["spec"]["containers"][0]["args"]
    assert args[args.index(flag) + 1] == value, args
    endpoints = _ready_endpoints(cluster, f"{MODEL}-router", "http")
    ip = (pods[0].get("status") or {}).get("podIP")
    return f"http://{endpoints[0]}" if len(endpoints) == 1 and endpoints[0].startswith(f"{ip}:") else None


def _router_metric(base: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        return metric_value(response.read().decode(), name, model=MODEL, **labels) or 0.0


def _decisions(cluster: Cluster, role: str, direction: str, reason: str) -> float:
    """kvrelay_autoscaler_decisions_total from the operator pod's /metrics (every decision counts there;
    status is written only on a change or as a heartbeat)."""
    (pod,) = cluster.get("pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/component=operator")["items"]
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:9090/metrics", timeout=10) as response:
        text = response.read().decode()
    labels = {"model": MODEL, "role": role, "direction": direction, "reason": reason}
    return metric_value(text, "kvrelay_autoscaler_decisions_total", **labels) or 0.0


def _ready_condition(cluster: Cluster) -> dict[str, Any]:
    return next(c for c in _model_status(cluster).get("conditions", []) if c["type"] == "Ready")


def _until(condition: Any, timeout: float, what: str, cluster: Cluster) -> Any:
    """wait_for, with the model's status and the pods' logs (read at the timeout) in the failure."""
    try:
        return wait_for(condition, timeout=timeout, interval=0.5, what=what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; status {_model_status(cluster)}{cluster.logs()}") from None


def test_scale_to_zero_holds_a_request_until_the_autoscaler_brings_both_pools_back(
    served: Cluster, reference: References, prometheus: str
) -> None:
    """Both roles at minReplicas 0 in mode auto: idle, the autoscaler takes them to zero (only the router's
    series are left in Prometheus, and they keep the metrics fresh); an openai request is then held at the
    router, its waiting gauge reaches Prometheus, the autoscaler scales both roles from 0 to 1, real worker
    pods start, and the request completes with the tokens `kvrelay serve` gives."""
    wait_for(
        lambda: query(prometheus, f'up{{pod=~"{MODEL}-router-.*"}} == 1'), timeout=60, interval=1,
        what=f"Prometheus scraping the router: {query(prometheus, 'up')}",
    )  # fmt: skip
    old_routers = {p["metadata"]["name"] for p in _pods(served, "router")}
    _patch_model(served, {
        "autoscaling": {
            "mode": "auto", "prometheusUrl": prometheus, "intervalSeconds": 5,
            "scaleUpCooldownSeconds": 0, "scaleDownCooldownSeconds": 5,
            "slo": {"ttftSeconds": 60, "itlSeconds": 10},
            "profile": {"prefillTokensPerSecond": 100000, "decodeTokensPerSecond": 100000},
        },
        "prefill": {"replicas": 1, "minReplicas": 0, "maxReplicas": 1},
        "decode": {"replicas": 1, "minReplicas": 0, "maxReplicas": 1},
        # Above what a worker pod here takes to start and load the tiny model.
        "router": {"maxWaitSeconds": 240},
    })  # fmt: skip
    router = _until(
        lambda: _router_rolled(served, old_routers, "--max-wait-seconds", "240"), 120,
        "the router rolled with --max-wait-seconds 240", served,
    )  # fmt: skip
    went_to_zero = time.monotonic()

    def at_zero() -> bool:
        status = _model_status(served)
        desired = [(status.get(role) or {}).get("desiredReplicas") for role in ("prefill", "decode")]
        return desired == [0, 0] and not _live_pods(served, "prefill") and not _live_pods(served, "decode")

    _until(at_zero, 240, "both pools scaled to zero by the autoscaler", served)
    went_to_zero = time.monotonic() - went_to_zero
    ready = _until(
        lambda: (c := _ready_condition(served))["reason"] == "ScaledToZero" and c,
        60,
        "Ready: ScaledToZero",
        served,
    )
    assert ready["status"] == "True", ready
    assert "prefill and decode scaled to zero: requests wait at the router (up to 240 s)" in ready["message"]
    with urllib.request.urlopen(f"{router}/ready", timeout=10) as response:
        assert response.status == 200  # the router stays in its Service: it holds requests
    # No worker series is fresh now, yet the autoscaler decides (it does not hold for want of metrics).
    _until(
        lambda: not query(prometheus, f'kvrelay_requests_running{{model="{MODEL}"}}'), 60,
        "the workers' series gone stale in Prometheus", served,
    )  # fmt: skip
    assert "down to zero: no load for" in _model_status(served)["autoscaler"]["reason"]
    at_zero_before = _decisions(served, "decode", "none", "idle")
    holds_before = _decisions(served, "decode", "none", "no_metrics")
    _until(
        lambda: _decisions(served, "decode", "none", "idle") >= at_zero_before + 3, 60,
        "three autoscaler decisions at zero (code idle) from the router's series alone", served,
    )  # fmt: skip
    assert _decisions(served, "decode", "none", "no_metrics") == holds_before

    from openai import OpenAI

    client = OpenAI(base_url=f"{router}/v1", api_key="unused", timeout=300, max_retries=0)
    answer: dict[str, Any] = {}

    def ask() -> None:
        started = time.monotonic()
        try:
            done = client.completions.create(
                model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
            )
            assert done.usage is not None
            answer["got"] = (
                done.choices[0].text,
                done.usage.completion_tokens,
                done.choices[0].finish_reason,
            )
        except Exception as exc:  # the test reports it
            answer["error"] = exc
        answer["seconds"] = time.monotonic() - started

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    waiting = f'kvrelay_router_requests_waiting_for_replicas{{model="{MODEL}",role="decode"}}'
    held = _until(
        lambda: query(prometheus, f"{waiting} > 0"), 60, f"the held request in Prometheus' {waiting}", served
    )
    assert float(held[0]["value"][1]) == 1.0
    assert query(
        prometheus, f'kvrelay_router_requests_waiting_for_replicas{{model="{MODEL}",role="prefill"}} == 1'
    )
    asker.join(timeout=300)
    assert not asker.is_alive(), f"the held request never finished{served.logs()}"
    assert "error" not in answer, f"{answer}{served.logs()}"
    assert answer["got"] == reference.short[0]
    status = _model_status(served)
    assert (status["prefill"]["desiredReplicas"], status["decode"]["desiredReplicas"]) == (1, 1), status
    for role in ("prefill", "decode"):
        (pod,) = _live_pods(served, role)
        assert pod["spec"]["nodeName"] == f"{role}-0"
    events = served.get("events", "-n", MODEL_NS, "--field-selector", "reason=AutoscalerDecision")["items"]
    ups = [e["message"] for e in events if "prefill 0->1, decode 0->1" in e["message"]]
    assert (
        ups and "up from zero: 1 request(s) wait at the router for a prefill and decode replica" in ups[-1]
    ), [e["message"] for e in events]
    assert _router_metric(router, "kvrelay_router_replica_wait_seconds_count") == 1.0
    assert _router_metric(router, "kvrelay_router_requests_waiting_for_replicas", role="decode") == 0.0
    print(json.dumps({"to_zero_s": round(went_to_zero, 1), "held_request_s": round(answer["seconds"], 1)}))


def test_a_request_held_past_the_max_wait_gets_a_503_with_retry_after(served: Cluster) -> None:
    """Decode at zero with nothing to bring it back (autoscaling off): the router holds one request for
    maxWaitSeconds, then answers 503 `no_ready_replicas` with Retry-After; one more while it is held finds
    the queue (maxWaitingRequests 1) full and gets its 503 at once."""
    old_routers = {p["metadata"]["name"] for p in _pods(served, "router")}
    _patch_model(served, {
        "autoscaling": {"mode": "off"},
        "prefill": {"replicas": 1, "minReplicas": 0, "maxReplicas": 1},
        "decode": {"replicas": 0, "minReplicas": 0, "maxReplicas": 1},
        "router": {"maxWaitSeconds": 3, "maxWaitingRequests": 1},
    })  # fmt: skip
    router = _until(
        lambda: _router_rolled(served, old_routers, "--max-wait-seconds", "3"), 120,
        "the router rolled with --max-wait-seconds 3", served,
    )  # fmt: skip
    _until(
        lambda: not _live_pods(served, "decode")
        and len(_ready_endpoints(served, f"{MODEL}-prefill", "grpc")) == 1,
        180, "decode at zero and prefill serving", served,
    )  # fmt: skip
    ready = _until(
        lambda: (c := _ready_condition(served))["reason"] == "ScaledToZero" and c,
        60,
        "Ready: ScaledToZero",
        served,
    )
    assert ready["status"] == "True" and "decode scaled to zero" in ready["message"], ready

    import httpx

    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}
    first: dict[str, Any] = {}

    def ask() -> None:
        started = time.monotonic()
        first["response"] = httpx.post(f"{router}/v1/completions", json=body, timeout=60)
        first["seconds"] = time.monotonic() - started

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    _until(
        lambda: _router_metric(router, "kvrelay_router_requests_waiting_for_replicas", role="decode") == 1,
        10, "the first request held", served,
    )  # fmt: skip
    started = time.monotonic()
    full = httpx.post(f"{router}/v1/completions", json=body, timeout=60)
    assert full.status_code == 503 and time.monotonic() - started < 2, full.text
    assert full.headers["retry-after"] == "3"
    assert full.json()["error"]["code"] == "no_ready_replicas"
    assert (
        "no ready replica of the decode role, and 1 requests already wait" in full.json()["error"]["message"]
    )
    asker.join(timeout=30)
    response = first["response"]
    assert response.status_code == 503 and 3 <= first["seconds"] < 10, (response.text, first["seconds"])
    assert response.headers["retry-after"] == "3"
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("no_ready_replicas", "service_unavailable")
    assert error["message"].startswith("no ready replica of the decode role after waiting 3 s"), error
    refusals = "kvrelay_router_replica_wait_refusals_total"
    assert _router_metric(router, refusals, reason="timeout") == 1.0
    assert _router_metric(router, refusals, reason="queue_full") == 1.0
    assert _router_metric(router, "kvrelay_router_requests_waiting_for_replicas", role="decode") == 0.0
