"""Operator reconcile cost against a real kube-apiserver + etcd (the control-plane test harness).

Everything is observed from outside the operator: the API server's own request counters
(`apiserver_request_total` on its /metrics), the children it serves and their resourceVersions.

Figures, printed as one JSON line:
- create_to_children_s_median: time from a CR's create to all 15 children present, median of N;
- noop_writes_per_reconcile: API writes per reconcile after an operator restart with nothing
  changed (API server counts; must be 0, and no child's resourceVersion may move), vs a naive
  operator that server-side applies every child on every reconcile (baseline measured in the
  same run). A no-op resume leaves no trace on the API server, so when the resumes are done is
  told by kopf's own per-object log record ("Resuming is processed");
- bulk_*: M CRs in one namespace: time until all children exist, until the API server has served
  nothing more for them (settled), and the API requests the operator sent per CR (the API
  server's count less the bench's own creates and LISTs).

    python bench/operator_reconcile.py [--creates 20] [--bulk 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "controlplane"))

import kvrelay_envtest as envtest  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402
from kvrelay_operator import api, apply, handlers, resources  # noqa: E402
from kvrelay_operator.kube import CHILD_KINDS, KubeClient  # noqa: E402

NUM_CHILDREN = 15  # 3 x (Deployment, Service, PDB, NetworkPolicy), router SA + Role + RoleBinding
CHILD_KIND_NAMES = ("Service", "Deployment", "PodDisruptionBudget", "ServiceAccount", "Role", "RoleBinding",
                    "NetworkPolicy")  # fmt: skip
# configmaps: no longer a child, kept so that a stray write would show.
OUR_RESOURCES = {"configmaps", "services", "serviceaccounts", "deployments", "poddisruptionbudgets", "roles",
                 "rolebindings", "networkpolicies", api.PLURAL, "events"}  # fmt: skip
NAIVE_SAMPLE = 50  # models the naive re-apply baseline is timed on
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE"}
METRIC_RE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def apiserver_requests(cp: envtest.ControlPlane) -> Counter[str]:
    """verb -> requests the API server has served for our resources (from its own /metrics).

    WATCH is left out: kopf's watches are long-running and re-opened on their own schedule.
    """
    counts: Counter[str] = Counter()
    for line in cp.get("/metrics", timeout=30).decode().splitlines():
        match = METRIC_RE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("resource") in OUR_RESOURCES and labels["verb"] != "WATCH":
            counts[labels["verb"]] += int(float(match["value"]))
    return counts


def writes(counts: Counter[str]) -> int:
    return sum(n for verb, n in counts.items() if verb in WRITE_VERBS)


def cr(name: str) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
            "spec": {"model": {"source": "/models/tiny"}, "kvTransfer": {"backend": "tcp"}}}  # fmt: skip


def create(kube: KubeClient, namespace: str, name: str) -> None:
    kube.create(cr(name), namespace)


def count_children(kube: KubeClient, namespace: str, instance: str | None = None) -> int:
    selector = f"{resources.LABEL_NAME}={resources.APP_NAME}"
    if instance:
        selector += f",{resources.LABEL_INSTANCE}={instance}"
    return sum(len(kube.list(CHILD_KINDS[k], k, namespace, selector)) for k in CHILD_KIND_NAMES)


def operator(namespace: str) -> KopfRunner:
    return KopfRunner(
        ["run", "--standalone", "--namespace", namespace, "-m", "kvrelay_operator.handlers"], timeout=120
    )


def wait_idle(cp: envtest.ControlPlane, quiet_s: float = 2.0, timeout: float = 300.0) -> float:
    """Until the API server has served no request for our resources for quiet_s (the caller must
    not send any meanwhile); returns the perf_counter time its counters were last seen to move."""
    state: dict[str, Any] = {"counts": None, "since": time.perf_counter()}

    def quiet() -> bool:
        counts, now = apiserver_requests(cp), time.perf_counter()
        if counts != state["counts"]:
            state["counts"], state["since"] = counts, now
        return now - state["since"] >= quiet_s

    envtest.wait_for(quiet, timeout=timeout, interval=0.2, what="API server quiet")
    return float(state["since"])


class ResumeCounter(logging.Filter):
    """Counts kopf's per-object "Resuming is processed" records; lets only warnings through."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Resuming is processed"):
            self.count += 1
        return record.levelno >= logging.WARNING


def bench_creates(kube: KubeClient, kubectl_ns: Any, num: int) -> list[float]:
    """Seconds from create to all children present, one CR at a time."""
    namespace = "bench-create"
    kubectl_ns(namespace)
    durations = []
    with operator(namespace) as runner:
        for i in range(num):
            start = time.perf_counter()
            create(kube, namespace, f"m{i}")
            envtest.wait_for(lambda i=i: count_children(kube, namespace, f"m{i}") == NUM_CHILDREN, timeout=60,
                             interval=0.02, what=f"children of m{i}")  # fmt: skip
            durations.append(time.perf_counter() - start)
    assert runner.exception is None, runner.output[-2000:]
    return durations


def child_versions(kube: KubeClient, namespace: str) -> dict[str, str]:
    """Kind/name -> resourceVersion of every child and every model in a namespace."""
    selector = f"{resources.LABEL_NAME}={resources.APP_NAME}"
    found = {
        f"{kind}/{item['metadata']['name']}": item["metadata"]["resourceVersion"]
        for kind in CHILD_KIND_NAMES
        for item in kube.list(CHILD_KINDS[kind], kind, namespace, selector)
    }
    for item in kube.list(api.API_VERSION, api.KIND, namespace, ""):
        found[f"{api.KIND}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    return found


def bench_bulk(cp: envtest.ControlPlane, kube: KubeClient, kubectl_ns: Any, num: int) -> dict[str, Any]:
    """num CRs in one namespace: bulk create cost, then a no-op restart vs a naive re-apply."""
    namespace = "bench-bulk"
    kubectl_ns(namespace)
    out: dict[str, Any] = {}
    with operator(namespace) as runner:
        wait_idle(cp, quiet_s=1.0)
        server_before, bench_before = apiserver_requests(cp), Counter(kube.requests)
        start = time.perf_counter()
        for i in range(num):
            create(kube, namespace, f"m{i}")
        envtest.wait_for(
            lambda: count_children(kube, namespace) == num * NUM_CHILDREN,
            timeout=600, interval=1.0, what="all bulk children",
        )  # fmt: skip
        out["bulk_children_present_s"] = round(time.perf_counter() - start, 3)
        settled = wait_idle(cp)
        out["bulk_settled_s"] = round(settled - start, 3)
        server = apiserver_requests(cp) - server_before
        bench = Counter(kube.requests) - bench_before  # the bench's own creates and polling LISTs
    assert runner.exception is None, runner.output[-2000:]
    out["bulk_handler_errors"] = runner.output.count("failed with an exception")
    out["bulk_apiserver_requests"] = dict(server)  # kopf's own patches/events included, WATCH not
    out["bulk_bench_requests"] = dict(bench)
    out["bulk_api_requests_per_cr"] = round((sum(server.values()) - sum(bench.values())) / num, 2)

    # No-op restart: nothing changed, so nothing may be written.
    versions_before = child_versions(kube, namespace)
    resumes = ResumeCounter()
    objects_log = logging.getLogger("kopf.objects")
    objects_log.setLevel(logging.INFO)
    objects_log.addFilter(resumes)
    server_before = apiserver_requests(cp)
    start = time.perf_counter()
    try:
        with operator(namespace) as runner:
            envtest.wait_for(lambda: resumes.count >= num, timeout=300, interval=0.05, what="all resumes")
            resume_s = time.perf_counter() - start
            wait_idle(cp)
            server = apiserver_requests(cp) - server_before
    finally:
        objects_log.removeFilter(resumes)
        objects_log.setLevel(logging.WARNING)
    assert runner.exception is None, runner.output[-2000:]
    versions_after = child_versions(kube, namespace)
    out["noop_resumes"] = resumes.count
    out["noop_resume_s"] = round(resume_s, 3)
    out["noop_apiserver_requests"] = dict(server)
    out["noop_writes_per_reconcile"] = writes(server) / num
    out["noop_objects_changed"] = sum(versions_before[k] != versions_after.get(k) for k in versions_before)
    out["noop_objects_checked"] = len(versions_before)  # children + models

    # Baseline: a naive operator re-applies every child (server-side apply) on each reconcile.
    naive = KubeClient.from_environment()
    ctx = resources.RenderContext(
        name="", namespace=namespace, uid="", default_image=handlers.DEFAULT_WORKER_IMAGE
    )
    sample = naive.list(api.API_VERSION, api.KIND, namespace, "")[:NAIVE_SAMPLE]  # time-boxed baseline
    server_before = apiserver_requests(cp)
    start = time.perf_counter()
    for item in sample:
        spec = api.DisaggregatedModelSpec.model_validate(item["spec"])
        status = api.DisaggregatedModelStatus.model_validate(item.get("status") or {})
        c = ctx.model_copy(update={"name": item["metadata"]["name"], "uid": item["metadata"]["uid"]})
        for child in resources.render_children(spec, status, c):
            naive.apply(apply.with_hash(child))
    naive_s = time.perf_counter() - start
    naive_server = apiserver_requests(cp) - server_before
    out["naive_reconciles"] = len(sample)
    out["naive_reapply_s_per_reconcile"] = round(naive_s / len(sample), 4)
    out["noop_resume_s_per_reconcile"] = round(resume_s / num, 4)
    out["naive_writes_per_reconcile"] = writes(naive_server) / len(sample)
    out["noop_resume_vs_naive_time_ratio"] = round((resume_s / num) / (naive_s / len(sample)), 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=20)
    parser.add_argument("--bulk", type=int, default=200)
    args = parser.parse_args()
    assets, reason = envtest.find_assets()
    if assets is None:
        print(json.dumps({"bench": "operator_reconcile", "error": reason}))
        return 1
    kubectl, reason = envtest.find_kubectl()
    if kubectl is None:
        print(json.dumps({"bench": "operator_reconcile", "error": reason}))
        return 1
    logging.getLogger("kopf").setLevel(logging.WARNING)
    with envtest.control_plane(assets) as cp:
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        envtest.run_kubectl(kubectl, cp, "apply", "-f", str(ROOT / "crds"))
        envtest.run_kubectl(
            kubectl, cp, "wait", "--for=condition=Established", "crd/disaggregatedmodels.kvrelay.dev"
        )

        def make_ns(name: str) -> None:
            envtest.run_kubectl(kubectl, cp, "create", "namespace", name)

        kube = KubeClient.from_environment()
        creates = bench_creates(kube, make_ns, args.creates)
        bulk = bench_bulk(cp, kube, make_ns, args.bulk)
    result = {
        "bench": "operator_reconcile",
        "creates": args.creates,
        "create_to_children_s_median": round(statistics.median(creates), 4),
        "create_to_children_s_p90": round(sorted(creates)[int(0.9 * (len(creates) - 1))], 4),
        "bulk_crs": args.bulk,
        **bulk,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
