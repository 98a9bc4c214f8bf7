"""Every dashboard panel's PromQL returns data from a real Prometheus scraping a live local stack.

The stack: `kvrelay serve` (router + 1 prefill + 1 decode worker, real KV relay); `kvrelay-operator`
(handlers, autoscaler timer, its own /metrics) on a real kube-apiserver with a DisaggregatedModel
whose advisory autoscaler reads that same Prometheus; Prometheus (Debian package) scraping the router,
the workers and the operator every second; and an OpenAI client putting streaming load on
the router. Then each query of each panel and annotation (Grafana variables substituted) is run as
written and checked by what it is:

- a constant (`vector($ttft_slo)`, an SLO line): exactly the variable's value, one unlabelled sample;
- a query with a fallback (`... or vector(0)`): it answers whatever happens, so an answer proves
  nothing; its finite answer is checked, and every metric it reads must be declared by a scraped target
  (a misspelt name would otherwise hide behind the fallback);
- any other panel query must see real series: each selector in it matches series scraped from the
  stack's targets, and the answer has at least one finite sample (NaN only beside finite ones) and no
  +Inf/-Inf;
- an annotation marks events (a replica change) and none may have happened: it runs as written, its
  selectors match real scraped series, and whatever it returns is finite and positive.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml
from kvrelay_operator import dashboards
from kvrelay_worker.processes import stop_process
from prometheus_fixtures import free_port, query, run_prometheus
from serve_helpers import WORKER_RE, ServeProcess, run_serve

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# Series only the operator exports (docs/wire-contracts.md section 4, "Operator").
OPERATOR_SERIES = ("kvrelay_autoscaler_desired_replicas", "kvrelay_autoscaler_decisions_total")
MODEL = "tiny"  # kvrelay serve's served name, and the DisaggregatedModel's: the `model` label joins them
SCRAPE_INTERVAL_S = 1
NUM_REQUESTS, CONCURRENCY, MAX_TOKENS, LOAD_SECONDS = 24, 4, 12, 10.0


# A metric selector in a panel's PromQL: `kvrelay_x_total{model=~"tiny", role="decode"}` or a bare name.
SELECTOR = re.compile(r"\b(kvrelay_[a-z0-9_]+)(\{[^}]*\})?")
FALLBACK = re.compile(r"\s+or\s+(?=.*\bvector\()")  # `X or vector(0)`, `X or label_replace(vector(0), ...)`


def _cases() -> list[tuple[str, str, str]]:
    """(dashboard, panel or annotation, PromQL) of every query the dashboards run."""
    panels = [
        (spec.uid, panel.title, query.expr)
        for spec in dashboards.dashboard_specs()
        for panel in spec.panels()
        for query in panel.queries
    ]
    annotations = [
        (spec.uid, f"annotation {name}", expr)
        for spec in dashboards.dashboard_specs()
        for name, expr in spec.annotations
    ]
    return panels + annotations


@dataclass
class Stack:
    """The live stack: serve and the Prometheus scraping it."""

    serve: ServeProcess
    prometheus_url: str
    jobs: dict[str, list[str]]  # what Prometheus scrapes: job -> host:port targets
    _declared: set[str] | None = None

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result vector (raises on a PromQL error)."""
        return query(self.prometheus_url, expr)

    def declared_metrics(self) -> set[str]:
        """Every metric name the scraped targets declare (`# TYPE` lines), with or without samples."""
        if self._declared is None:
            self._declared = set()
            for target in (t for targets in self.jobs.values() for t in targets):
                with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
                    text = response.read().decode()
                self._declared |= set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
        return self._declared

    def declares(self, name: str) -> bool:
        """A scraped target exports `name` (a counter's `_total`, a histogram's `_bucket`, ...)."""
        base = re.sub(r"_(total|bucket|count|sum|created)$", "", name)
        return bool({name, base} & self.declared_metrics())

    def assert_real_series(self, promql: str, what: str) -> None:
        """Each selector in `promql` matches series that Prometheus scraped from the stack's targets."""
        selectors = {m.group(0) for m in SELECTOR.finditer(promql)}
        assert selectors, f"{what}: no metric selector in {promql}"
        for selector in selectors:
            jobs = {r["metric"].get("job") for r in self.query(f"count by (job) ({selector})")}
            assert jobs, f"{what}: no scraped series for {selector}"
            assert jobs <= set(self.jobs), f"{what}: {selector} from unexpected jobs {jobs}"


def _load(serve: ServeProcess) -> int:
    """Streaming completions, several at once, for LOAD_SECONDS so every rate() window sees them move."""
    client = openai.OpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=120)
    stop_at = time.monotonic() + LOAD_SECONDS

    def worker(w: int) -> list[int]:
        chunks, i = [], 0
        while time.monotonic() < stop_at or i < NUM_REQUESTS // CONCURRENCY:
            stream = client.completions.create(
                model=serve.model, prompt=f"request {w}.{i}: " + "tell me about kv caches " * (1 + i % 4),
                max_tokens=MAX_TOKENS, temperature=0.0, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks.append(sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text))
            i += 1
        return chunks

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        chunks = [n for per_worker in pool.map(worker, range(CONCURRENCY)) for n in per_worker]
    assert len(chunks) >= NUM_REQUESTS and min(chunks) >= 2, f"load streamed too little: {chunks}"
    return len(chunks)


def _envtest() -> object:
    """tests/controlplane/kvrelay_envtest.py: the control-plane harness the operator tests use."""
    sys.path.insert(0, str(ROOT / "tests" / "controlplane"))
    return importlib.import_module("kvrelay_envtest")


@dataclass
class Operator:
    """The kvrelay-operator process and the kubectl bound to its cluster."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    kubectl: Path
    kubeconfig: Path

    def apply(self, manifest: dict) -> None:
        cmd = [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", "apply", "-f", "-"]
        subprocess.run(cmd, input=json.dumps(manifest), check=True, capture_output=True, text=True)


@contextlib.contextmanager
def run_operator(workdir: Path, metrics_port: int, prometheus_url: str) -> Iterator[Operator]:
    """kube-apiserver + CRDs + kvrelay-operator itself (handlers, autoscaler timer, its own /metrics)."""
    envtest = _envtest()
    assets, why = envtest.find_assets()
    if assets is None:
        pytest.skip(f"no kube-apiserver: {why}")
    kubectl, why = envtest.find_kubectl()
    if kubectl is None:
        pytest.skip(f"no kubectl: {why}")
    with envtest.control_plane(assets) as plane:
        base = [str(kubectl), f"--kubeconfig={plane.kubeconfig}"]
        subprocess.run([*base, "apply", "-f", str(ROOT / "crds")], check=True, capture_output=True)
        crd = "crd/disaggregatedmodels.kvrelay.dev"
        subprocess.run([*base, "wait", "--for=condition=Established", crd, "--timeout=60s"], check=True)
        command = [
            sys.executable, "-c", "import sys; from kvrelay_operator.main import main; sys.exit(main())",
            "--all-namespaces", "--no-leader-elect", "--liveness=", f"--metrics-port={metrics_port}",
            f"--prometheus-url={prometheus_url}", "--worker-image=kvrelay/kvrelay:test",
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        log_path = workdir / "operator.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield Operator(proc, log_path, kubectl, plane.kubeconfig)
        finally:
            stop_process(proc, grace_s=20)


def chart_alert_rules() -> str:
    """The chart's alert rules as a plain rules file (helm template of the alerts ConfigMap)."""
    tools = os.environ.get("KVRELAY_TOOLS_BIN")
    if not tools:
        done = subprocess.run(
            ["bash", str(ROOT / "hack" / "install-tools.sh")], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"no helm: hack/install-tools.sh failed: {done.stderr[-500:]}")
        tools = done.stdout.strip().splitlines()[-1]
    cmd = [str(Path(tools) / "helm"), "template", "t", str(ROOT / "charts" / "kvrelay")]
    cmd += ["--show-only", "templates/alerts-configmap.yaml", "--set", "alerts.configMap.enabled=true"]
    rendered = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(rendered)["data"]["kvrelay-alerts.rules.yaml"]


def _model_cr(prometheus_url: str) -> dict:
    return {
        "apiVersion": "kvrelay.dev/v1alpha1",
        "kind": "DisaggregatedModel",
        "metadata": {"name": MODEL, "namespace": "default"},
        "spec": {
            "model": {"source": "/models/tiny", "servedName": MODEL},
            "kvTransfer": {"backend": "tcp", "transport": "tcp"},
            "autoscaling": {"mode": "advisory", "intervalSeconds": 5, "prometheusUrl": prometheus_url},
        },
    }


def _wait(stack: Stack, expr: str, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not stack.query(expr):
        assert time.monotonic() < deadline, f"{what} within {timeout_s}s"
        time.sleep(SCRAPE_INTERVAL_S)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("serve")
    with (
        run_serve(["--model", MODEL, "--prefill", "1", "--decode", "1"], logs) as serve,
        contextlib.ExitStack() as exits,
    ):
        worker_targets = [f"127.0.0.1:{m.group(4)}" for line in serve.output if (m := WORKER_RE.search(line))]
        assert len(worker_targets) == 2, serve.output[-20:]
        operator_port = free_port()
        jobs = {
            "kvrelay-router": [urllib.parse.urlparse(serve.base_url).netloc],
            "kvrelay-workers": worker_targets,
            "kvrelay-operator": [f"127.0.0.1:{operator_port}"],
        }
        rules = chart_alert_rules()
        url = exits.enter_context(
            run_prometheus(tmp_path_factory.mktemp("prometheus"), jobs, rules, SCRAPE_INTERVAL_S)
        )
        operator = exits.enter_context(run_operator(tmp_path_factory.mktemp("operator"), operator_port, url))
        stack = Stack(serve, url, jobs)
        # Prometheus applies new targets after a few seconds; load before that would go unseen.
        _wait(
            stack,
            f"count(up == 1) == {2 + len(worker_targets)}",
            "Prometheus did not scrape every target",
            60,
        )
        operator.apply(_model_cr(url))
        num_requests = _load(serve)
        _wait(
            stack,
            f"sum(kvrelay_requests_total) >= {num_requests}",
            "Prometheus did not see the whole load",
            30,
        )
        # The advisory autoscaler decides every 5s from the same Prometheus; wait for a decision made
        # after the load, so its inputs were real.
        _wait(
            stack, "sum(increase(kvrelay_autoscaler_decisions_total[15s])) > 0", "no autoscaler decision", 60
        )
        assert operator.proc.poll() is None, operator.log_path.read_text()[-3000:]
        yield stack
    log = operator.log_path.read_text()
    assert "Traceback" not in log and "failed with an exception" not in log, log[-3000:]


def test_every_target_is_scraped(stack: Stack) -> None:
    up = {r["metric"]["job"]: float(r["value"][1]) for r in stack.query("min by (job) (up)")}
    assert up == {"kvrelay-router": 1.0, "kvrelay-workers": 1.0, "kvrelay-operator": 1.0}


def _values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


@pytest.mark.parametrize(("dashboard", "panel", "expr"), _cases(), ids=lambda v: str(v)[:60])
def test_panel_query_returns_data(stack: Stack, dashboard: str, panel: str, expr: str) -> None:
    promql = dashboards.expand_variables(expr, model=MODEL, rate_interval="1m", range_="5m")
    what = f"{dashboard} / {panel}: {promql}"
    result = stack.query(promql)  # every query runs as the dashboard sends it
    values = _values(result)
    if panel.startswith("annotation "):
        # An event marker: none may have happened, but its series must be real, and a marker
        # (if any) a finite positive count.
        stack.assert_real_series(promql, what)
        assert all(math.isfinite(v) and v > 0 for v in values), f"{what}: got {result}"
    elif not SELECTOR.search(promql):
        # A constant line (an SLO): the variable's value, whatever Prometheus holds.
        constant = re.fullmatch(r"vector\(([^()]+)\)", promql.strip())
        assert constant, f"{what}: neither a metric selector nor a constant vector(...)"
        expected = float(constant.group(1))
        assert [(r["metric"], v) for r, v in zip(result, values, strict=True)] == [({}, expected)], what
        assert math.isfinite(values[0]), what
    elif FALLBACK.search(promql):
        # Answers whatever happens: what it reads must exist, and its answer must be finite.
        real = FALLBACK.split(promql, maxsplit=1)[0]
        assert all(math.isfinite(v) for v in values) and values, f"{what}: got {result}"
        assert all(math.isfinite(v) for v in _values(stack.query(real))), f"{what}: {real}"
        for name in {m.group(1) for m in SELECTOR.finditer(real)}:
            assert stack.declares(name), f"{what}: no scraped target exports {name}"
    else:
        stack.assert_real_series(promql, what)
        assert not any(math.isinf(v) for v in values), f"{what}: infinite sample in {result}"
        assert any(math.isfinite(v) for v in values), f"{what}: no finite sample (got {result})"


def test_chart_alert_rules_evaluate_cleanly_on_live_series(stack: Stack) -> None:
    """The chart's alerts, loaded into the same Prometheus: each evaluates without error."""
    url = f"{stack.prometheus_url}/api/v1/rules"
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            rules = [r for g in json.load(response)["data"]["groups"] for r in g["rules"]]
        if rules and all(
            r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules
        ):
            break
        assert time.monotonic() < deadline, f"rules not evaluated in 30s: {rules}"
        time.sleep(1)
    assert {r["name"] for r in rules} == {
        "KvrelayTTFTSLOBurn", "KvrelayITLSLOBurn", "KvrelayPoolAtMaxWhileSLOViolated",
        "KvrelayKVTransferFailures", "KvrelayOperatorDown",
    }  # fmt: skip
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, broken
    # The operator is scraped and up here, so OperatorDown must be quiet.
    down = next(r for r in rules if r["name"] == "KvrelayOperatorDown")
    assert down["state"] == "inactive", down


def test_a_misspelt_metric_would_fail(stack: Stack) -> None:
    # The check above is only as good as an empty answer for a wrong name: prove that it is empty.
    typo = dashboards.expand_variables('sum(rate(kvrelay_request_total{model=~"$model"}[$__rate_interval]))')
    assert stack.query(typo) == []
    with pytest.raises(AssertionError, match="no scraped series"):
        stack.assert_real_series(typo, "typo")
    # Behind a fallback the typo answers, so the fallback check looks the name up instead.
    assert stack.query(f"{typo} or vector(0)") != []
    assert not stack.declares("kvrelay_request_total") and stack.declares("kvrelay_requests_total")
    assert stack.declares("kvrelay_kv_transfer_failures_total")  # declared, though nothing failed
