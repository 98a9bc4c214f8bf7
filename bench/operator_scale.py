"""The operator at scale: N DisaggregatedModels in several namespaces under one operator process.

One cluster-wide `kvrelay-operator` process (leader election on, as the chart runs it), on a real
kube-apiserver + etcd with kube-controller-manager, kube-scheduler and kwok nodes, so that every
model's pods are created, scheduled and go Ready (kwok plays the kubelet; nobody writes a status by
hand) and every model can reach phase Ready.

Who sent what is told from outside the operator: its writes from the API server's audit log, by user
agent (kopf's `kopf/...` and the operator's Kubernetes client `OpenAPI-Generator/...`; the bench's
own client says `kvrelay-scale-bench`, the controllers and kwok theirs), its reads from the API
server's `apiserver_request_total` (GET and LIST on the operator's kinds and pods) less the bench's
own, counted by the bench. RSS and CPU seconds are the operator process's own: /proc/<pid>/status
VmRSS and /proc/<pid>/stat utime + stime.

Figures, printed as one JSON line:
- stages: models are created in stages up to each milestone (default 1, 100, N); per stage
  `children_present_s` (first create -> all 15 children of every model listed, counted with
  label-selected, metadata-only LISTs per namespace and kind, polled every POLL_S),
  `ready_s` (-> every model's status.phase Ready: its Deployments' pods are all Ready),
  `settled_s` (-> the API server served nothing more for the models' kinds, pods, ReplicaSets and
  EndpointSlices and the operator's CPU went idle), `operator_writes_per_model` /
  `operator_reads_per_model` (requests the operator sent for that stage's new models, Lease
  renewals left out), `operator_writes` (by verb and resource; "(kopf)" marks kopf's own: its
  annotations, Events, the autoscaler timer's status patch), `creations_processed` (kopf's
  "Creation is processed" records so far: more than the models means create handlers ran twice),
  `operator_cpu_s`, `neighbours_cpu_s` (etcd, kube-apiserver, controllers, kwok, Prometheus),
  `host_busy_cpu_s` and `others_on_host_cpu_s` (what processes outside this run took), then the
  operator's `rss_mib`, `cpu_s` (cumulative), threads and open fds once settled;
- rss_mib_at / cpu_s_at: the same keyed by model count (0 = started, idle, no model);
  rss_marginal_kib_per_model: RSS growth from the second-last to the last milestone, per model;
- noop_*: the operator restarted with nothing changed: `noop_writes` must be 0 (Lease renewals,
  which do not depend on the models, are counted apart in `noop_lease_writes`),
  `noop_objects_changed` of `noop_objects_checked` children and models whose resourceVersion moved,
  `noop_resume_s` (process start -> kopf logged "Resuming is processed" for every model),
  `noop_settled_s`, `noop_reads_per_model`, `noop_cpu_s` and `noop_rss_mib` of the new process;
- autoscaler_*: `spec.autoscaling.mode: auto` patched into every model (default interval 30 s),
  Prometheus a real, empty one (no series: every decision holds, and says why in status):
  `autoscaler_enable_writes_per_model`, `autoscaler_models_decided` and
  `autoscaler_first_decision_s` (patch -> every model has a decision; null if not all did within
  --first-decision-timeout), then a window of `autoscaler_window_s`: the operator's writes in it
  (by verb and resource) and per model per hour, `autoscaler_decisions_per_model_per_hour` (from
  the operator's own kvrelay_autoscaler_decisions_total; 120 if it keeps up with a 30 s interval),
  `autoscaler_status_writes_per_model_per_hour` (the timer's status patches: a decision reaches
  status only when it changes something, else as a 300 s heartbeat, so use a window of several
  heartbeats; `autoscaler_models_deciding_in_window` counts the models that wrote one), Prometheus
  queries per decision and per second, the operator's CPU seconds per model per hour and CPU share,
  its RSS, threads, open fds and TCP connections to Prometheus by state, and a sample model's
  `status.autoscaler.reason`. The operator holds one Prometheus connection per autoscaled model,
  and Prometheus serves 512 at most by default (--web.max-connections): past that, reads wait
  for a connection to free up; --prometheus-max-connections raises it to measure the timer's own
  cost.

    python bench/operator_scale.py [--models 1000] [--namespaces 10] [--milestones 1,100] \
        [--autoscaler-window 180] [--prometheus-max-connections N] [--no-pods] [--workdir DIR]

--no-pods runs no controllers, scheduler or kwok (as operator_reconcile.py): children only, no
pod, so no model goes Ready (ready_s is null).

Needs KUBEBUILDER_ASSETS with kube-controller-manager and kube-scheduler, kwok
(hack/build-controlplane.sh), prometheus on PATH (hack/install-prometheus.sh).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "controlplane"))

import kvrelay_envtest as envtest  # noqa: E402
import kwok_nodes  # noqa: E402
from kvrelay_operator import api, resources  # noqa: E402
from kvrelay_operator.kube import CHILD_KINDS, PLURALS  # noqa: E402
from kvrelay_worker.ports import free_port, free_ports  # noqa: E402
from kvrelay_worker.processes import stop_process  # noqa: E402

NUM_CHILDREN = 15  # 3 x (Deployment, Service, PDB, NetworkPolicy), router SA + Role + RoleBinding
CHILD_KIND_NAMES = ("Service", "Deployment", "PodDisruptionBudget", "ServiceAccount", "Role", "RoleBinding",
                    "NetworkPolicy")  # fmt: skip
PODS_PER_MODEL = 3  # prefill, decode, router: one replica each
BENCH_AGENT = "kvrelay-scale-bench"
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")  # kopf's client; kvrelay_operator.kube and the Lease
# The operator's kinds, and pods (it reads them only to pick scale-down victims).
OPERATOR_RESOURCES = {PLURALS[k] for k in CHILD_KIND_NAMES} | {api.PLURAL, "events", "pods"}
# What must stop moving for a stage to count as settled: the operator's kinds and the pods'
# machinery (not leases, nodes, endpoints: the API server and kwok renew those on their own clock).
SETTLE_RESOURCES = OPERATOR_RESOURCES | {"replicasets", "endpointslices"}
READ_VERBS = {"GET", "LIST"}
METRIC_RE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
SELECTOR = f"{resources.LABEL_NAME}={resources.APP_NAME}"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"
# Fake nodes: room for every pod (GPU workers, CPU routers) on few nodes; kwok renews their Leases.
NODE_PODS = 250
CLIENT_QPS = 500  # for kube-controller-manager and kube-scheduler (their default 20-50 would pace the run)
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_CPU_SHARE = 0.03  # an operator using less of a core counts as idle (--idle-cpu-share)
POLL_S = 2.0  # the bench's polling interval while waiting for children and Ready
# The harness's service range (a /24) holds 254 ClusterIPs; every model's router Service takes one.
SERVICE_CIDR = "10.0.0.0/16"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the control plane: controllers and kwok with client rate limits raised ------------------------


def start_controllers(cp: envtest.ControlPlane, assets: Path, timeout_s: float = 90.0) -> None:
    """kube-controller-manager and kube-scheduler as in kvrelay_envtest, with client QPS raised: at
    their defaults the deployment controller alone (20 QPS) would take minutes over 3,000 Deployments."""
    kcm_port, scheduler_port = free_ports(2)
    kubeconfig = str(cp.kubeconfig)
    certs = cp.workdir / "certs"
    delegated = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                 f"--authorization-kubeconfig={kubeconfig}"]  # fmt: skip
    kcm, kcm_log = envtest.start_logged(cp.processes, cp.workdir, "kube-controller-manager", [
        str(assets / "kube-controller-manager"), *delegated, "--leader-elect=false",
        f"--secure-port={kcm_port}", "--bind-address=127.0.0.1", f"--cert-dir={cp.workdir / 'kcm-certs'}",
        "--controllers=*", f"--service-account-private-key-file={certs / 'sa.key'}",
        f"--root-ca-file={certs / 'ca.crt'}", "--use-service-account-credentials=false",
        f"--kube-api-qps={CLIENT_QPS}", f"--kube-api-burst={2 * CLIENT_QPS}",
        "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10",
    ])  # fmt: skip
    config = cp.workdir / "kube-scheduler.yaml"
    config.write_text(yaml.safe_dump({
        "apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig, "qps": CLIENT_QPS, "burst": 2 * CLIENT_QPS},
        "leaderElection": {"leaderElect": False},
    }))  # fmt: skip
    scheduler, scheduler_log = envtest.start_logged(cp.processes, cp.workdir, "kube-scheduler", [
        str(assets / "kube-scheduler"), f"--config={config}", *delegated[1:],
        f"--secure-port={scheduler_port}", "--bind-address=127.0.0.1",
        f"--cert-dir={cp.workdir / 'scheduler-certs'}",
    ])  # fmt: skip
    envtest._wait_http(f"https://127.0.0.1:{kcm_port}/healthz", timeout_s, kcm, cp.token, log=kcm_log)
    envtest._wait_http(f"https://127.0.0.1:{scheduler_port}/readyz", timeout_s, scheduler, cp.token,
                       log=scheduler_log)  # fmt: skip


def start_kwok(cp: envtest.ControlPlane, kwok: Path, num_nodes: int) -> None:
    """kwok as in kwok_nodes.start_kwok, and num_nodes untainted nodes with room
    for NODE_PODS pods each (GPUs included)."""
    key, value = kwok_nodes.KWOK_ANNOTATION
    home = cp.workdir / "kwok-home"
    home.mkdir(exist_ok=True)
    _, kwok_log = envtest.start_logged(cp.processes, cp.workdir, "kwok", [
        str(kwok), f"--kubeconfig={cp.kubeconfig}", f"--config={kwok.parent / 'stages.yaml'}",
        "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={key}={value}",
        f"--node-lease-duration-seconds={kwok_nodes.NODE_LEASE_SECONDS}", f"--cidr={kwok_nodes.POD_CIDR}",
    ], env={**os.environ, "HOME": str(home)})  # fmt: skip
    envtest.wait_for(lambda: '"msg":"Watch nodes"' in kwok_log.read_text(), timeout=30, what="kwok to start")
    capacity = {"cpu": "960", "memory": "16Ti", "pods": str(NODE_PODS), "ephemeral-storage": "16Ti",
                kwok_nodes.GPU_RESOURCE: str(NODE_PODS)}  # fmt: skip
    specs = [kwok_nodes.NodeSpec(f"scale-{i}", "scale", capacity, zone=f"zone-{'ab'[i % 2]}")
             for i in range(num_nodes)]  # fmt: skip
    kwok_nodes.add_kwok_nodes(cp, specs, ready_timeout_s=60)


@contextlib.contextmanager
def empty_prometheus(
    workdir: Path, processes: list[subprocess.Popen[bytes]], max_connections: int = 0
) -> Iterator[str]:
    """A real Prometheus that scrapes nothing: every autoscaler query answers with no series. Its
    process is added to `processes` (for its CPU seconds)."""
    binary = os.environ.get("KVRELAY_PROMETHEUS") or shutil.which("prometheus")
    if not binary:
        raise RuntimeError("no prometheus: run hack/install-prometheus.sh")
    (workdir / "prometheus.yml").write_text("global: {scrape_interval: 15s}\nscrape_configs: []\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (workdir / "prometheus.log").open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'prom'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
             *([f"--web.max-connections={max_connections}"] if max_connections else [])],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    processes.append(proc)
    try:
        envtest.wait_for(lambda: requests.get(f"{url}/-/ready", timeout=2).ok, timeout=60, what="prometheus")
        yield url
    finally:
        stop_process(proc, grace_s=15)


def prometheus_queries(url: str) -> int | None:
    """Instant queries Prometheus has answered (its own counter); None if it does not answer in
    30 s (with its connections all taken, it does not)."""
    try:
        text = requests.get(f"{url}/metrics", timeout=30).text
    except requests.RequestException:
        return None
    pattern = r'^prometheus_http_requests_total\{[^}]*handler="/api/v1/query"[^}]*\} (\S+)$'
    return sum(int(float(v)) for v in re.findall(pattern, text, re.MULTILINE))


# --- the bench's own API client ----------------------------------------------------------------------


class BenchClient:
    """Requests as the admin with user agent BENCH_AGENT; counts them per (resource, verb) as the API
    server's metrics label them, so they can be taken out of its counts."""

    def __init__(self, cp: envtest.ControlPlane) -> None:
        self.cp = cp
        self.requests: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            session = requests.Session()
            session.headers.update({"Authorization": f"Bearer {self.cp.token}", "User-Agent": BENCH_AGENT})
            self._local.session = session
        return self._local.session

    def call(
        self,
        method: str,
        path: str,
        resource: str,
        verb: str,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> dict[str, Any]:
        with self._lock:
            self.requests[(resource, verb)] += 1
        headers = {"Accept": accept, "Content-Type": content_type}
        data = json.dumps(body) if body is not None else None
        # verify= on each request: REQUESTS_CA_BUNDLE in the environment would override a session's.
        response = self._session().request(method, self.cp.server + path, data=data, headers=headers,
                                           verify=str(self.cp.ca_file), timeout=60)  # fmt: skip
        if not response.ok:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

    def count_children(self, kind: str, namespace: str) -> int:
        path = envtest_collection(CHILD_KINDS[kind], kind, namespace)
        listed = self.call(
            "GET", f"{path}?labelSelector={SELECTOR}", PLURALS[kind], "LIST", accept=METADATA_LIST
        )
        return len(listed.get("items") or [])

    def models(self, namespace: str | None = None) -> list[dict[str, Any]]:
        path = (envtest_collection(api.API_VERSION, api.KIND, namespace) if namespace
                else f"/apis/{api.API_VERSION}/{api.PLURAL}")  # fmt: skip
        return self.call("GET", path, api.PLURAL, "LIST").get("items") or []

    def versions(self) -> dict[str, str]:
        """kind/namespace/name -> resourceVersion of every child and model, cluster-wide (metadata LISTs)."""
        found = {}
        for kind in (*CHILD_KIND_NAMES, api.KIND):
            version = api.API_VERSION if kind == api.KIND else CHILD_KINDS[kind]
            prefix = f"/api/{version}" if "/" not in version else f"/apis/{version}"
            path = f"{prefix}/{PLURALS[kind]}" + ("" if kind == api.KIND else f"?labelSelector={SELECTOR}")
            for item in (
                self.call("GET", path, PLURALS[kind], "LIST", accept=METADATA_LIST).get("items") or []
            ):
                meta = item["metadata"]
                found[f"{kind}/{meta['namespace']}/{meta['name']}"] = meta["resourceVersion"]
        return found

    def reads(self) -> Counter[str]:
        with self._lock:
            return Counter({res: n for (res, verb), n in self.requests.items() if verb in READ_VERBS})


def envtest_collection(api_version: str, kind: str, namespace: str) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"


def apiserver_requests(cp: envtest.ControlPlane) -> Counter[tuple[str, str]]:
    """(resource, verb) -> requests the API server has served, WATCH left out (from its /metrics)."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in cp.get("/metrics", timeout=30).decode().splitlines():
        match = METRIC_RE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("resource") and labels["verb"] != "WATCH":
            counts[(labels["resource"], labels["verb"])] += int(float(match["value"]))
    return counts


def server_reads(counts: Counter[tuple[str, str]]) -> Counter[str]:
    return Counter(
        {res: n for (res, verb), n in counts.items() if verb in READ_VERBS and res in OPERATOR_RESOURCES}
    )


class Audit:
    """The operator's writes, from the API server's audit log (every write, with its user agent)."""

    def __init__(self, cp: envtest.ControlPlane) -> None:
        self.cp = cp
        self.offset = 0
        self.decided: set[str] = set()  # models with a decision written since mark()

    def mark(self) -> None:
        _, self.offset = self.cp.writes(self.offset)

    def since_mark(self) -> tuple[Counter[str], Counter[str]]:
        """(operator writes as "verb resource[/subresource]", all writers' user agents) since mark()."""
        events, _ = self.cp.writes(self.offset)
        ours: Counter[str] = Counter()
        agents: Counter[str] = Counter()
        self.decided = set()
        for event in events:
            agent = event.get("userAgent", "")
            agents[agent.split(" ")[0]] += 1
            if agent.startswith(OPERATOR_AGENTS):
                ref = event.get("objectRef") or {}
                what = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                kopf = agent.startswith("kopf/")
                ours[f"{event['verb']} {what}" + (" (kopf)" if kopf else "")] += 1
                if kopf and what == f"{api.PLURAL}/status":  # the autoscaler timer's decisions
                    self.decided.add(f"{ref.get('namespace')}/{ref.get('name')}")
        return ours, agents


def non_lease(writes: Counter[str]) -> int:
    return sum(n for key, n in writes.items() if not key.endswith(" leases"))


def host_busy_s() -> float:
    """CPU seconds all cores of this host have spent busy so far (/proc/stat: all but idle, iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / CLK_TCK


def components_cpu_s(cp: envtest.ControlPlane) -> Counter[str]:
    """CPU seconds used so far by etcd, kube-apiserver, the controllers, kwok and Prometheus (the
    operator's neighbours on this host)."""
    return Counter(
        {Path(str(p.args[0])).name: process_cpu_s(p.pid) for p in cp.processes if p.poll() is None}
    )


# --- the operator process ------------------------------------------------------------------------------


class Operator:
    """`python -m kvrelay_operator.main --all-namespaces` (leader election on, as the chart runs it)."""

    def __init__(self, cp: envtest.ControlPlane, log_path: Path, prometheus_url: str) -> None:
        self.log_path = log_path
        self.metrics_port = free_port()
        liveness = f"http://127.0.0.1:{free_port()}/healthz"
        args = [sys.executable, "-m", "kvrelay_operator.main", "--all-namespaces",
                "--liveness", liveness, "--metrics-port", str(self.metrics_port),
                "--prometheus-url", prometheus_url, "--lease-namespace", "default"]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        self.started = time.perf_counter()
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

    def stats(self) -> dict[str, Any]:
        """RSS (MiB), its peak, CPU seconds (user + system), threads and open file descriptors."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}: {self.log_tail()}")
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        field = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_mib": round(int(field["VmRSS"].split()[0]) / 1024, 1),
            "rss_peak_mib": round(int(field["VmHWM"].split()[0]) / 1024, 1),
            "cpu_s": round(self.cpu_s(), 2),
            "threads": int(field["Threads"]),
            "fds": len(os.listdir(f"/proc/{self.proc.pid}/fd")),
        }

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def decisions(self) -> int | None:
        """Autoscaler decisions so far, from its own kvrelay_autoscaler_decisions_total (one per
        model per decision: the prefill role's series); None if /metrics does not answer."""
        try:
            text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text
        except requests.RequestException:
            return None
        pattern = r'^kvrelay_autoscaler_decisions_total\{[^}]*role="prefill"[^}]*\} (\S+)$'
        return sum(int(float(v)) for v in re.findall(pattern, text, re.MULTILINE))

    def log_tail(self) -> str:
        return self.log_text()[-3000:]

    def stop(self) -> None:
        """SIGTERM: kopf stops, the Lease is released, the process exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def settle(cp: envtest.ControlPlane, operator: Operator, quiet_s: float = 3.0, timeout: float = 600) -> float:
    """Until the API server served nothing on SETTLE_RESOURCES and the operator used under
    IDLE_CPU_SHARE of a core for quiet_s (the caller sends nothing meanwhile); returns when that
    quiet began (perf_counter)."""
    state: dict[str, Any] = {"counts": None, "since": time.perf_counter(), "cpu": operator.cpu_s()}

    def quiet() -> bool:
        counts = Counter({k: n for k, n in apiserver_requests(cp).items() if k[0] in SETTLE_RESOURCES})
        now, cpu = time.perf_counter(), operator.cpu_s()
        busy = cpu - state["cpu"] > IDLE_CPU_SHARE * max(now - state["since"], 0.5)
        if counts != state["counts"] or busy:
            state.update(counts=counts, since=now, cpu=cpu)
        return now - state["since"] >= quiet_s

    envtest.wait_for(quiet, timeout=timeout, interval=1.0, what="API server and operator quiet")
    return float(state["since"])


# --- the stages -------------------------------------------------------------------------------------------


def model_cr(name: str) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
            "spec": {"model": {"source": "/models/tiny"}, "kvTransfer": {"backend": "tcp"}}}  # fmt: skip


def placement(i: int, namespaces: list[str]) -> tuple[str, str]:
    return namespaces[i % len(namespaces)], f"m{i:04d}"


def parallel(fn: Callable[[int], Any], items: range, workers: int = 4) -> None:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(fn, i) for i in items]:
            future.result()


def is_ready(model: dict[str, Any]) -> bool:
    return (model.get("status") or {}).get("phase") == "Ready"


def wait_children_and_ready(
    bench: BenchClient,
    operator: Operator,
    per_ns: Counter[str],
    per_kind: dict[str, int],
    start: float,
    timeout: float,
    ready: bool = True,
) -> tuple[float, float | None]:
    """Seconds from start until every model has all its children, and (if `ready`) until every one
    is Ready.

    Each round LISTs the kinds a namespace is still short of, moving on to the next namespace at
    the first kind short; once every child exists, the models of one namespace at a time until
    one is not all Ready. So the bench's polling stays at a few requests a second (and is taken
    out of the API server's counts anyway). Resolution: one round, POLL_S plus its LISTs.
    """
    pending = {ns: list(per_kind) for ns in sorted(per_ns)}
    not_ready = sorted(per_ns) if ready else []
    children_s = None
    deadline = time.monotonic() + timeout
    last_log = time.monotonic()
    while pending or not_ready:
        if time.monotonic() > deadline:
            raise TimeoutError(f"children short in {sorted(pending)}, not all Ready in {not_ready}")
        for ns in list(pending):
            kinds = pending[ns]
            while kinds and bench.count_children(kinds[0], ns) == per_ns[ns] * per_kind[kinds[0]]:
                kinds.pop(0)
            if not kinds:
                del pending[ns]
        if not pending and children_s is None:
            children_s = time.perf_counter() - start
        while children_s is not None and not_ready:
            listed = bench.models(not_ready[0])
            if len(listed) < per_ns[not_ready[0]] or not all(is_ready(m) for m in listed):
                break
            not_ready.pop(0)
        if pending or not_ready:
            if time.monotonic() - last_log >= 15:
                last_log = time.monotonic()
                log(f"  {time.perf_counter() - start:.0f} s: {len(pending)} namespaces short of children, "
                    f"{len(not_ready)} not all Ready; operator {operator.stats()}")  # fmt: skip
            time.sleep(POLL_S)
    assert children_s is not None
    return children_s, time.perf_counter() - start if ready else None


def learn_children(bench: BenchClient, namespace: str) -> dict[str, int]:
    """Children per kind of the one model in namespace, once all NUM_CHILDREN are there."""
    counts: dict[str, int] = {}

    def complete() -> bool:
        counts.update({kind: bench.count_children(kind, namespace) for kind in CHILD_KIND_NAMES})
        return sum(counts.values()) == NUM_CHILDREN

    envtest.wait_for(complete, timeout=120, interval=0.2, what="the first model's children")
    return {k: n for k, n in counts.items() if n}


class Run:
    """One run's shared pieces."""

    def __init__(
        self, cp: envtest.ControlPlane, bench: BenchClient, workdir: Path, prometheus: str, pods: bool
    ) -> None:
        self.cp, self.bench, self.workdir, self.prometheus = cp, bench, workdir, prometheus
        self.pods = pods  # controllers and kwok run: pods exist and models can go Ready
        self.audit = Audit(cp)
        self.agents: Counter[str] = Counter()

    def window(self) -> tuple[Counter[tuple[str, str]], Counter[str]]:
        """Marks the start of a measured window: (API server counts, bench reads) now."""
        self.audit.mark()
        return apiserver_requests(self.cp), self.bench.reads()

    def close(self, start: tuple[Counter[tuple[str, str]], Counter[str]]) -> tuple[Counter[str], int]:
        """(operator writes, operator reads) since window()."""
        server_before, bench_before = start
        writes, agents = self.audit.since_mark()
        self.agents += agents
        reads = server_reads(apiserver_requests(self.cp)) - server_reads(server_before)
        reads = reads - (self.bench.reads() - bench_before)
        return writes, sum(reads.values())


def stage(run: Run, operator: Operator, namespaces: list[str], first: int, last: int,
          per_kind: dict[str, int] | None) -> tuple[dict[str, Any], dict[str, int]]:  # fmt: skip
    """Creates models first..last-1, waits for children, Ready, settled; the stage's figures."""
    new = last - first
    counts = run.window()
    cpu_before, neighbours_before = operator.cpu_s(), components_cpu_s(run.cp)
    host_before, bench_before = host_busy_s(), process_cpu_s(os.getpid())
    start = time.perf_counter()

    def create(i: int) -> None:
        ns, name = placement(i, namespaces)
        run.bench.call(
            "POST", envtest_collection(api.API_VERSION, api.KIND, ns), api.PLURAL, "POST", model_cr(name)
        )

    parallel(create, range(first, last))
    created_s = time.perf_counter() - start
    if per_kind is None:
        per_kind = learn_children(run.bench, placement(first, namespaces)[0])
    per_ns = Counter(placement(i, namespaces)[0] for i in range(last))
    children_s, ready_s = wait_children_and_ready(
        run.bench, operator, per_ns, per_kind, start, timeout=1200, ready=run.pods
    )
    settled = settle(run.cp, operator)
    writes, reads = run.close(counts)
    stats = operator.stats()
    neighbours = components_cpu_s(run.cp) - neighbours_before
    host, bench_cpu = host_busy_s() - host_before, process_cpu_s(os.getpid()) - bench_before
    operator_cpu = operator.cpu_s() - cpu_before
    out = {
        "models": last, "new_models": new, "created_s": round(created_s, 2),
        "children_present_s": round(children_s, 2),
        "ready_s": round(ready_s, 2) if ready_s is not None else None,
        "settled_s": round(settled - start, 2),
        "operator_writes_per_model": round(non_lease(writes) / new, 2),
        "operator_reads_per_model": round(reads / new, 2),
        "operator_writes": dict(writes.most_common()),
        "operator_cpu_s": round(operator_cpu, 2),
        "neighbours_cpu_s": {k: round(v, 1) for k, v in neighbours.items()},
        "bench_cpu_s": round(bench_cpu, 1), "host_busy_cpu_s": round(host, 1),
        "others_on_host_cpu_s": round(host - operator_cpu - neighbours.total() - bench_cpu, 1),
        "creations_processed": operator.log_text().count("Creation is processed"), **stats,
    }  # fmt: skip
    log(f"stage to {last} models: {json.dumps(out)}")
    return out, per_kind


def noop_restart(run: Run, operator: Operator, num: int) -> tuple[dict[str, Any], Operator]:
    """Stops the operator, starts a new one with nothing changed; what it wrote, read and cost."""
    versions_before = run.bench.versions()
    operator.stop()
    counts = run.window()
    fresh = Operator(run.cp, run.workdir / "operator-2.log", run.prometheus)

    def resumed() -> bool:
        if fresh.proc.poll() is not None:
            raise RuntimeError(f"operator exited: {fresh.log_tail()}")
        return fresh.log_text().count("Resuming is processed") >= num

    envtest.wait_for(resumed, timeout=600, interval=0.2, what="every model resumed")
    resume_s = time.perf_counter() - fresh.started
    settled = settle(run.cp, fresh)
    writes, reads = run.close(counts)
    versions_after = run.bench.versions()
    stats = fresh.stats()
    out = {
        "noop_resume_s": round(resume_s, 2), "noop_settled_s": round(settled - fresh.started, 2),
        "noop_writes": non_lease(writes), "noop_lease_writes": writes.total() - non_lease(writes),
        "noop_writes_by_kind": dict(writes.most_common()),
        "noop_reads_per_model": round(reads / num, 3),
        "noop_objects_changed": sum(versions_before[k] != versions_after.get(k) for k in versions_before),
        "noop_objects_checked": len(versions_before),
        "noop_cpu_s": stats["cpu_s"], "noop_rss_mib": stats["rss_mib"],
        "noop_rss_peak_mib": stats["rss_peak_mib"],
    }  # fmt: skip
    log(f"no-op restart: {json.dumps(out)}")
    return out, fresh


def prometheus_connections(url: str) -> Counter[str]:
    """States of this host's TCP connections to Prometheus (/proc/net/tcp): the operator's, as the
    bench's own last only for one /metrics read."""
    port = int(url.rsplit(":", 1)[1])
    names = {"01": "established", "06": "time_wait", "08": "close_wait"}
    states: Counter[str] = Counter()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port:
            states[names.get(fields[3], fields[3])] += 1
    return states


def models_decided(bench: BenchClient) -> int:
    return sum(1 for m in bench.models() if (m.get("status") or {}).get("autoscaler"))


def autoscaler_on(run: Run, operator: Operator, namespaces: list[str], num: int, window_s: float,
                  first_decision_timeout_s: float) -> dict[str, Any]:  # fmt: skip
    """mode auto for every model; the switch's cost, then a window's writes, decisions and CPU.

    The window starts once every model has decided once, or after first_decision_timeout_s with
    however many have (autoscaler_models_decided says how many).
    """
    counts = run.window()
    start = time.perf_counter()
    patch = {"spec": {"autoscaling": {"mode": "auto"}}}

    def enable(i: int) -> None:
        ns, name = placement(i, namespaces)
        path = f"{envtest_collection(api.API_VERSION, api.KIND, ns)}/{name}"
        run.bench.call("PATCH", path, api.PLURAL, "PATCH", patch, content_type="application/merge-patch+json")

    parallel(enable, range(num))
    deadline = time.monotonic() + first_decision_timeout_s
    while (decided := models_decided(run.bench)) < num and time.monotonic() < deadline:
        time.sleep(5.0)
    waited = time.perf_counter() - start
    writes, reads = run.close(counts)
    out: dict[str, Any] = {
        "autoscaler_first_decision_s": round(waited, 2) if decided == num else None,
        "autoscaler_models_decided": decided,
        "autoscaler_enable_wait_s": round(waited, 2),
        "autoscaler_enable_writes_per_model": round(non_lease(writes) / num, 2),
        "autoscaler_enable_writes": dict(writes.most_common()),
        "autoscaler_prometheus_connections_after_enable": dict(prometheus_connections(run.prometheus)),
    }  # fmt: skip
    log(f"autoscaler on: {json.dumps(out)}")

    counts = run.window()
    queries_before, decisions_before = prometheus_queries(run.prometheus), operator.decisions()
    cpu_before, start = operator.cpu_s(), time.perf_counter()
    time.sleep(window_s)
    elapsed = time.perf_counter() - start
    cpu = operator.cpu_s() - cpu_before
    queries_after, decisions_after = prometheus_queries(run.prometheus), operator.decisions()
    queries = None if queries_before is None or queries_after is None else queries_after - queries_before
    writes, reads = run.close(counts)
    stats = operator.stats()
    per_hour = 3600.0 / elapsed / num
    status_writes = writes.get("patch disaggregatedmodels/status (kopf)", 0)  # the timer's status patch
    num_decisions = (
        None if decisions_before is None or decisions_after is None else decisions_after - decisions_before
    )
    decisions_per_hour = None if num_decisions is None else round(num_decisions * per_hour, 1)
    sample = run.bench.models(namespaces[0])[0].get("status") or {}
    out.update({
        "autoscaler_window_s": round(elapsed, 1),
        "autoscaler_writes": dict(writes.most_common()),
        "autoscaler_writes_per_model_per_hour": round(non_lease(writes) * per_hour, 1),
        "autoscaler_decisions_per_model_per_hour": decisions_per_hour,
        "autoscaler_status_writes_per_model_per_hour": round(status_writes * per_hour, 1),
        "autoscaler_models_deciding_in_window": len(run.audit.decided),
        "autoscaler_reads_per_model_per_hour": round(reads * per_hour, 1),
        "autoscaler_prometheus_queries_per_decision": round(queries / num_decisions, 2)
        if num_decisions and queries is not None else None,
        "autoscaler_prometheus_queries_per_s": round(queries / elapsed, 1) if queries is not None else None,
        "autoscaler_cpu_s_per_model_per_hour": round(cpu * per_hour, 2),
        "autoscaler_operator_cpu_share": round(cpu / elapsed, 3),
        "autoscaler_rss_mib": stats["rss_mib"], "autoscaler_threads": stats["threads"],
        "autoscaler_fds": stats["fds"],
        "autoscaler_prometheus_connections": dict(prometheus_connections(run.prometheus)),
        "autoscaler_sample_reason": (sample.get("autoscaler") or {}).get("reason"),
        "autoscaler_sample_phase": sample.get("phase"),
    })  # fmt: skip
    log(f"autoscaler window: {json.dumps(out)}")
    return out


def main() -> int:
    global IDLE_CPU_SHARE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--milestones", default="1,100", help="model counts to measure at before --models")
    parser.add_argument(
        "--autoscaler-window", type=float, default=180.0, help="seconds; 0 skips the autoscaler"
    )
    parser.add_argument(
        "--first-decision-timeout", type=float, default=240.0,
        help="seconds to wait for every model's first decision before the window starts anyway",
    )  # fmt: skip
    parser.add_argument(
        "--prometheus-max-connections", type=int, default=0,
        help="Prometheus --web.max-connections (0: its default, 512)",
    )  # fmt: skip
    parser.add_argument(
        "--no-pods", action="store_true",
        help="no controllers, scheduler or kwok: children only (no pod, no Ready), as operator_reconcile.py",
    )  # fmt: skip
    parser.add_argument(
        "--idle-cpu-share", type=float, default=IDLE_CPU_SHARE,
        help="operator CPU share (of a core) below which it counts as settled",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="operator and Prometheus logs (default: a temp dir)")
    args = parser.parse_args()
    IDLE_CPU_SHARE = args.idle_cpu_share
    milestones = sorted(
        {int(m) for m in args.milestones.split(",") if m and int(m) < args.models} | {args.models}
    )
    assets, reason = envtest.find_assets(controllers=True)
    kwok, why = kwok_nodes.find_kwok(assets)
    if assets is None or kwok is None:
        print(json.dumps({"bench": "operator_scale", "error": reason or why}))
        return 1
    kubectl, reason = envtest.find_kubectl()
    if kubectl is None:
        print(json.dumps({"bench": "operator_scale", "error": reason}))
        return 1
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the operator and control plane are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvrelay-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    namespaces = [f"scale-{i}" for i in range(args.namespaces)]
    began = time.perf_counter()
    result: dict[str, Any] = {"bench": "operator_scale", "models": args.models, "namespaces": args.namespaces,
                              "pods": not args.no_pods, "cpus": os.cpu_count()}  # fmt: skip
    envtest.SERVICE_CIDR = SERVICE_CIDR  # read when control_plane() starts kube-apiserver
    with (
        envtest.control_plane(assets) as cp,
        empty_prometheus(workdir, cp.processes, args.prometheus_max_connections) as prometheus,
    ):
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        if not args.no_pods:
            start_controllers(cp, assets)
            start_kwok(cp, kwok, math.ceil(args.models * PODS_PER_MODEL / NODE_PODS * 1.2) + 1)
        envtest.run_kubectl(kubectl, cp, "apply", "-f", str(ROOT / "crds"))
        envtest.run_kubectl(kubectl, cp, "wait", "--for=condition=Established",
                            "crd/disaggregatedmodels.kvrelay.dev")  # fmt: skip
        bench = BenchClient(cp)
        for ns in namespaces:
            bench.call("POST", "/api/v1/namespaces", "namespaces", "POST",
                       {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})  # fmt: skip
        run = Run(cp, bench, workdir, prometheus, pods=not args.no_pods)
        operator = Operator(cp, workdir / "operator-1.log", prometheus)
        try:
            envtest.wait_for(lambda: "Lease" in operator.log_text() and operator.stats(), timeout=60,
                             what="operator started")  # fmt: skip
            settle(cp, operator)
            idle = operator.stats()
            log(f"operator started, no model: {idle}")
            stages, per_kind, done = [], None, 0
            for milestone in milestones:
                figures, per_kind = stage(run, operator, namespaces, done, milestone, per_kind)
                stages.append(figures)
                done = milestone
            result["children_per_model"] = per_kind
            result["stages"] = stages
            result["rss_mib_at"] = {"0": idle["rss_mib"], **{str(s["models"]): s["rss_mib"] for s in stages}}
            result["cpu_s_at"] = {"0": idle["cpu_s"], **{str(s["models"]): s["cpu_s"] for s in stages}}
            if len(stages) >= 2:
                a, b = stages[-2], stages[-1]
                result["rss_marginal_kib_per_model"] = round(
                    (b["rss_mib"] - a["rss_mib"]) * 1024 / (b["models"] - a["models"]), 1
                )
            result["handler_errors_first_run"] = operator.log_text().count("failed with an exception")
            noop, operator = noop_restart(run, operator, args.models)
            result.update(noop)
            if args.autoscaler_window > 0:
                result.update(autoscaler_on(run, operator, namespaces, args.models, args.autoscaler_window,
                                            args.first_decision_timeout))  # fmt: skip
            result["handler_errors_second_run"] = operator.log_text().count("failed with an exception")
        finally:
            operator.stop()
        result["writers_seen"] = dict(run.agents.most_common())
    result["bench_wall_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
