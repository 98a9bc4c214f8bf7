"""Scale-down victims: pod loads -> pod-deletion-cost (pure), reading loads from /metrics, and the
handler step that marks a pool before it shrinks (best effort)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from kubernetes.client.exceptions import ApiException
from kvrelay_operator import handlers
from kvrelay_operator.pod_load import PodLoadReader, metrics_url, parse_load
from kvrelay_operator.victims import DELETION_COST, PodLoad, WorkerPod, plan_deletion_costs
from prometheus_client import REGISTRY


def pod(
    name: str, *, ready: bool = True, created: str = "2026-01-01T00:00:00Z", **extra: object
) -> WorkerPod:
    return WorkerPod(name=name, ip="10.0.0.1", ready=ready, created=created, **extra)  # type: ignore[arg-type]


def test_busier_pods_cost_more_and_the_least_loaded_go_first() -> None:
    pods = [pod("busy"), pod("idle"), pod("mid")]
    loads = {
        "busy": PodLoad(running=8, waiting=2, kv_cache_usage=0.9),
        "idle": PodLoad(running=0, waiting=0, kv_cache_usage=0.0),
        "mid": PodLoad(running=3, waiting=0, kv_cache_usage=0.4),
    }
    plan = plan_deletion_costs(pods, loads, num_removed=1)
    assert plan.costs == {"idle": 0, "mid": 1, "busy": 2}
    assert plan.victims == ["idle"]
    assert plan.changed == plan.costs  # none was annotated yet


def test_requests_held_outrank_kv_in_use_and_kv_breaks_ties() -> None:
    loads = {
        "many-requests": PodLoad(running=2, waiting=1, kv_cache_usage=0.1),
        "full-cache": PodLoad(running=2, waiting=0, kv_cache_usage=0.95),
        "same-requests-less-kv": PodLoad(running=1, waiting=1, kv_cache_usage=0.2),
    }
    plan = plan_deletion_costs([pod(n) for n in loads], loads, num_removed=2)
    assert plan.victims == ["same-requests-less-kv", "full-cache"]
    assert plan.costs["many-requests"] == 2


def test_not_ready_then_unreachable_pods_go_before_any_reachable_one() -> None:
    pods = [pod("idle"), pod("unreachable"), pod("starting", ready=False)]
    # A not-Ready pod's load is ignored even if one was read.
    loads = {"idle": PodLoad(), "starting": PodLoad(running=0)}
    plan = plan_deletion_costs(pods, loads, num_removed=2)
    assert plan.costs == {"starting": 0, "unreachable": 1, "idle": 2}
    assert plan.victims == ["starting", "unreachable"]


def test_equal_loads_send_the_newer_pod_first_then_by_name() -> None:
    pods = [
        pod("old", created="2026-01-01T00:00:00Z"),
        pod("new-b", created="2026-01-02T00:00:00Z"),
        pod("new-a", created="2026-01-02T00:00:00Z"),
    ]
    loads = {p.name: PodLoad(running=1) for p in pods}
    assert plan_deletion_costs(pods, loads, 1).costs == {"new-a": 0, "new-b": 1, "old": 2}


def test_terminating_pods_are_left_out_and_unchanged_annotations_are_not_rewritten() -> None:
    pods = [pod("a", deletion_cost="0"), pod("b", deletion_cost="7"), pod("gone", terminating=True)]
    loads = {"a": PodLoad(running=1), "b": PodLoad(running=2), "gone": PodLoad()}
    plan = plan_deletion_costs(pods, loads, num_removed=5)
    assert plan.costs == {"a": 0, "b": 1}
    assert plan.changed == {"b": 1}
    assert plan.victims == ["a", "b"]  # more to remove than pods: every live one, in order


def test_pod_body_is_read_as_the_api_returns_it() -> None:
    body = {
        "metadata": {
            "name": "m-decode-x", "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {DELETION_COST: "3", "other": "x"},
        },
        "status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip
    assert WorkerPod.from_body(body) == WorkerPod(
        name="m-decode-x", ip="10.1.2.3", ready=True, created="2026-01-01T00:00:00Z", deletion_cost="3"
    )
    pending = WorkerPod.from_body({"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:01Z"}})
    assert (pending.ready, pending.ip, pending.terminating, pending.deletion_cost) == (
        False,
        None,
        True,
        None,
    )


WORKER_METRICS = """\
# HELP kvrelay_requests_running Requests in the running batch.
# TYPE kvrelay_requests_running gauge
kvrelay_requests_running{model="tiny",role="decode"} 5.0
# HELP kvrelay_requests_waiting Requests queued (including those waiting for remote KV).
# TYPE kvrelay_requests_waiting gauge
kvrelay_requests_waiting{model="tiny",role="decode"} 2.0
# HELP kvrelay_kv_cache_usage_ratio Fraction of KV cache blocks in use, 0..1.
# TYPE kvrelay_kv_cache_usage_ratio gauge
kvrelay_kv_cache_usage_ratio{model="tiny",role="decode"} 0.625
# HELP kvrelay_generation_tokens_total Tokens generated.
# TYPE kvrelay_generation_tokens_total counter
kvrelay_generation_tokens_total{model="tiny",role="decode"} 1234.0
"""


def test_parse_load_reads_the_workers_series() -> None:
    assert parse_load(WORKER_METRICS) == PodLoad(running=5, waiting=2, kv_cache_usage=0.625)
    assert parse_load("# nothing yet\n") == PodLoad()


def test_metrics_url_fills_the_template_and_brackets_ipv6() -> None:
    v6 = WorkerPod(name="p", ip="fd00::5", ready=True)
    assert metrics_url("http://{ip}:{port}/metrics", "ns", v6, 9090) == "http://[fd00::5]:9090/metrics"
    v4 = WorkerPod(name="p", ip="10.0.0.5", ready=True)
    assert metrics_url("http://x/{namespace}/{pod}", "ns", v4, 9090) == "http://x/ns/p"


@pytest.fixture
def metrics_server() -> Iterator[str]:
    """Serves WORKER_METRICS at /good/metrics, 404 elsewhere; yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/good/metrics"
            self.send_response(200 if found else 404)
            self.end_headers()
            if found:
                self.wfile.write(WORKER_METRICS.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_reader_reads_ready_pods_and_reports_the_ones_it_could_not(metrics_server: str) -> None:
    reader = PodLoadReader(metrics_server + "/{pod}/metrics", timeout_s=2.0)
    pods = [
        WorkerPod(name="good", ip="10.0.0.1", ready=True),
        WorkerPod(name="missing", ip="10.0.0.2", ready=True),
        WorkerPod(name="not-ready", ip="10.0.0.3"),
        WorkerPod(name="no-ip", ready=True),
    ]
    loads, failures = reader.read("ns", pods, 9090)
    assert loads == {"good": PodLoad(running=5, waiting=2, kv_cache_usage=0.625)}
    assert set(failures) == {"missing"} and "404" in failures["missing"]


def test_reader_times_out_on_an_unreachable_pod_quickly() -> None:
    # 192.0.2.0/24 (TEST-NET-1) is never routed: the connect hangs until the timeout.
    reader = PodLoadReader(timeout_s=0.3)
    loads, failures = reader.read("ns", [WorkerPod(name="lost", ip="192.0.2.1", ready=True)], 9090)
    assert loads == {} and set(failures) == {"lost"}


SELECTOR = "app.kubernetes.io/name=kvrelay,app.kubernetes.io/instance=m"


class FakeKube:
    """Lists the pods it was given; refuses annotations of the pods named in `refuse`."""

    def __init__(
        self, pods: list[dict], refuse: frozenset[str] = frozenset(), list_fails: bool = False
    ) -> None:
        self.pods, self.refuse, self.list_fails = pods, refuse, list_fails
        self.annotated: dict[str, dict[str, str]] = {}

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict]:
        assert (api_version, kind) == ("v1", "Pod")
        assert label_selector == f"{SELECTOR},kvrelay.dev/role=decode"
        if self.list_fails:
            raise ApiException(status=403, reason="Forbidden")
        return self.pods

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> dict:
        if name in self.refuse:
            raise ApiException(status=403, reason="Forbidden")
        self.annotated[name] = annotations
        return {}


def pod_body(name: str) -> dict:
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }


def errors(step: str) -> float:
    labels = {"model": "served", "role": "decode", "step": step}
    return REGISTRY.get_sample_value("kvrelay_scale_down_victim_errors_total", labels) or 0.0


def test_marking_victims_never_blocks_the_scale_down(metrics_server: str) -> None:
    kube = FakeKube([pod_body("good"), pod_body("missing")], refuse=frozenset({"good"}))
    config = handlers.OperatorConfig(pod_metrics_url=metrics_server + "/{pod}/metrics")
    state = handlers.OperatorState(kube, config)  # type: ignore[arg-type]
    read, annotate = errors("read"), errors("annotate")
    # "missing" answers 404: unknown load, so it goes first; "good" refuses its annotation.
    assert handlers._maybe_mark_victims(state, "ns", "m", "served", "decode", 1) == ["missing"]
    assert kube.annotated == {"missing": {DELETION_COST: "0"}}
    assert (errors("read"), errors("annotate")) == (read + 1, annotate + 1)
    listing = errors("list")
    failing = handlers.OperatorState(FakeKube([], list_fails=True), config)  # type: ignore[arg-type]
    assert handlers._maybe_mark_victims(failing, "ns", "m", "served", "decode", 1) == []
    assert errors("list") == listing + 1
    # Not a scale-down: nothing is read or written.
    assert handlers._maybe_mark_victims(state, "ns", "m", "served", "decode", 0) == []
