"""Every dashboard panel's PromQL returns data from a real Prometheus scraping a live `kvrelay serve`.

The stack: `kvrelay serve` (router + 1 prefill + 1 decode worker, real KV relay), Prometheus (Debian
package) scraping the router's and workers' /metrics every second, and an OpenAI client putting
streaming load on it. Then each query of each panel (Grafana variables substituted) must return at
least one finite sample. Queries over the operator's autoscaler series need the operator, which
`kvrelay serve` does not run: those are reported as expected failures, not skipped silently.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
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
from serve_helpers import WORKER_RE, ServeProcess, run_serve

pytestmark = pytest.mark.e2e

# Series only the operator exports (docs/wire-contracts.md section 4, "Operator").
OPERATOR_SERIES = ("kvrelay_autoscaler_desired_replicas", "kvrelay_autoscaler_decisions_total")
SCRAPE_INTERVAL_S = 1
NUM_REQUESTS, CONCURRENCY, MAX_TOKENS, LOAD_SECONDS = 24, 4, 12, 10.0


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """The live stack: serve and the Prometheus scraping it."""

    serve: ServeProcess
    prometheus_url: str

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result vector (raises on a PromQL error)."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        why = "prometheus not on PATH (apt-get install -y --no-install-recommends prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + " (CI=true: nothing this machine can run may skip)")
        pytest.skip(why)
    return found


@contextlib.contextmanager
def run_prometheus(workdir: Path, jobs: dict[str, list[str]]) -> Iterator[str]:
    """A throwaway Prometheus scraping `jobs` (job name -> host:port targets); always stopped."""
    binary = _prometheus_binary()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": "5s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus not ready after 60s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("serve")
    with run_serve(["--model", "tiny", "--prefill", "1", "--decode", "1"], logs) as serve:
        worker_targets = [f"127.0.0.1:{m.group(4)}" for line in serve.output if (m := WORKER_RE.search(line))]
        assert len(worker_targets) == 2, serve.output[-20:]
        router_target = urllib.parse.urlparse(serve.base_url).netloc
        jobs = {"kvrelay-router": [router_target], "kvrelay-workers": worker_targets}
        with run_prometheus(tmp_path_factory.mktemp("prometheus"), jobs) as url:
            stack = Stack(serve, url)
            # Prometheus applies new targets after a few seconds; load before that would go unseen.
            deadline = time.monotonic() + 60
            while len(stack.query("up == 1")) < 1 + len(worker_targets):
                assert time.monotonic() < deadline, "Prometheus never scraped every target"
                time.sleep(SCRAPE_INTERVAL_S)
            num_requests = _load(serve)
            # Wait (bounded) until Prometheus has scraped the router's count of the whole load.
            deadline = time.monotonic() + 30
            while not stack.query(f"sum(kvrelay_requests_total) >= {num_requests}"):
                assert time.monotonic() < deadline, "Prometheus never saw the whole load"
                time.sleep(SCRAPE_INTERVAL_S)
            yield stack


def test_every_target_is_scraped(stack: Stack) -> None:
    up = {r["metric"]["job"]: float(r["value"][1]) for r in stack.query("min by (job) (up)")}
    assert up == {"kvrelay-router": 1.0, "kvrelay-workers": 1.0}


@pytest.mark.parametrize(("dashboard", "panel", "expr"), _cases(), ids=lambda v: str(v)[:60])
def test_panel_query_returns_data(stack: Stack, dashboard: str, panel: str, expr: str) -> None:
    promql = dashboards.expand_variables(expr, model=".*", rate_interval="1m", range_="5m")
    result = stack.query(promql)
    finite = [r for r in result if not math.isnan(float(r["value"][1]))]
    if any(name in expr for name in OPERATOR_SERIES) and not finite:
        pytest.xfail(f"{dashboard}/{panel}: needs the operator's autoscaler series; kvrelay serve runs none")
    assert finite, f"{dashboard} / {panel}: no data for {promql} (got {result})"


def test_a_misspelt_metric_would_fail(stack: Stack) -> None:
    # The check above is only as good as an empty answer for a wrong name: prove that it is empty.
    typo = dashboards.expand_variables('sum(rate(kvrelay_request_total{model=~"$model"}[$__rate_interval]))')
    assert stack.query(typo) == []
