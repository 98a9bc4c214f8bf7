"""The autoscaler end to end: a real Prometheus (Debian package) scrapes a real `kvrelay serve`
(router + tiny prefill and decode workers, real KV relay) under OpenAI-client load.

1. `PrometheusReader` turns the contract's series into a snapshot the policy acts on.
2. The operator (handlers + the autoscaler's kopf timer, in process) runs against a real
   kube-apiserver with a DisaggregatedModel in mode auto pointing at that Prometheus: under load
   it raises status.<role>.desiredReplicas, records why (status, Event, metrics), the reconciler
   scales the Deployments, and after the load stops and the cooldown passes it lowers them again.
   The controllers and the scheduler run, and kwok fake GPU nodes take the pods (Running/Ready
   without containers): nobody writes Deployment status by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
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

import openai
import pytest
import yaml
from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.prometheus import PrometheusReader, QuerySpec
from kvrelay_operator.autoscaler.types import PolicyConfig, PolicyState, RoleReplicas, Snapshot
from prometheus_fixtures import free_port, query, run_prometheus
from serve_helpers import WORKER_RE, ServeProcess, run_serve

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRAPE_SECONDS = 1
WINDOW_SECONDS = 10


class Load:
    """Streaming completions from a few client threads until stopped."""

    def __init__(self, serve: ServeProcess, concurrency: int = 4) -> None:
        self.client = openai.OpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=120)
        self.model = serve.model
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)
        ]

    def _run(self, worker: int) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                stream = self.client.completions.create(
                    model=self.model, prompt=f"{worker}.{i} " + "tell me about kv caches " * (4 + i % 4),
                    max_tokens=16, temperature=0.0, stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                tokens = sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text)
                assert tokens >= 2, f"request streamed {tokens} chunks"
                self.done += 1
            except BaseException as exc:  # reported by the test, never swallowed
                self.errors.append(exc)
                return
            i += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not self.errors, self.errors[:3]


@dataclass
class Stack:
    serve: ServeProcess
    prometheus_url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_serve(
        ["--model", "tiny", "--prefill", "1", "--decode", "1"], tmp_path_factory.mktemp("serve")
    ) as serve:
        workers = [f"127.0.0.1:{m.group(4)}" for line in serve.output if (m := WORKER_RE.search(line))]
        assert len(workers) == 2, serve.output[-20:]
        router = urllib.parse.urlparse(serve.base_url).netloc
        targets = {"kvrelay-router": [router], "kvrelay-workers": workers}
        with run_prometheus(
            tmp_path_factory.mktemp("prometheus"), targets, scrape_interval_s=SCRAPE_SECONDS
        ) as url:
            deadline = time.monotonic() + 60
            while len(query(url, "up == 1")) < 3:
                assert time.monotonic() < deadline, "Prometheus never scraped every target"
                time.sleep(SCRAPE_SECONDS)
            yield Stack(serve, url)


def test_reader_turns_live_series_into_a_snapshot_the_policy_acts_on(stack: Stack) -> None:
    reader = PrometheusReader(
        stack.prometheus_url, QuerySpec(model=stack.serve.model, window_seconds=WINDOW_SECONDS)
    )
    with Load(stack.serve) as load:
        time.sleep(WINDOW_SECONDS + 3 * SCRAPE_SECONDS)
        sample = reader.read()
    assert load.done >= 4
    assert sample is not None
    assert abs(time.time() - sample.observed_at) < 10  # fresh: the newest worker scrape
    assert sample.prompt_tokens_per_second and sample.prompt_tokens_per_second > 0
    assert sample.generation_tokens_per_second and sample.generation_tokens_per_second > 0
    assert sample.request_rate and sample.request_rate > 0
    assert sample.ttft_seconds is not None and 0 < sample.ttft_seconds < 60
    assert sample.itl_seconds is not None and 0 < sample.itl_seconds < 10
    assert sample.queued_prefill_tokens is not None and sample.kv_cache_usage_ratio is not None
    config = PolicyConfig(ttft_slo_seconds=5.0, itl_slo_seconds=1.0, prefill_tokens_per_second=1.0,
                          decode_tokens_per_second=1.0)  # fmt: skip
    one = RoleReplicas(current=1, ready=1)
    decision, _ = decide(
        Snapshot(metrics=sample, prefill=one, decode=one), PolicyState(), config, time.time()
    )
    assert not decision.hold
    assert decision.prefill.direction == "up" and decision.decode.direction == "up"
    assert decision.inputs["prompt_tokens_per_second"] == sample.prompt_tokens_per_second


def test_reader_reports_absent_model_and_unreachable_prometheus(stack: Stack) -> None:
    assert PrometheusReader(stack.prometheus_url, QuerySpec(model="no-such-model")).read() is None
    with pytest.raises(Exception, match=r"(?i)connect|refused|max retries"):
        PrometheusReader(f"http://127.0.0.1:{free_port()}", QuerySpec(model=stack.serve.model)).read()


# ---------------------------------------------------------------- operator against kube-apiserver


@pytest.fixture(scope="module")
def control_plane() -> Iterator[Any]:
    sys.path.insert(0, str(REPO_ROOT / "tests" / "controlplane"))
    import kvrelay_envtest as envtest
    import kwok_nodes

    assets, reason = envtest.find_assets(controllers=True)
    kubectl, kubectl_reason = envtest.find_kubectl()
    if assets is None or kubectl is None:
        pytest.skip(f"no control plane: {reason or kubectl_reason}")
    kwok, kwok_reason = kwok_nodes.find_kwok(assets)
    if kwok is None:
        pytest.skip(kwok_reason)
    with envtest.control_plane(assets, controllers=True) as cp:
        kwok_nodes.start_kwok(cp, kwok)
        # Untainted GPU nodes: examples/tiny.yaml sets no tolerations; room for 4+4 replicas.
        capacity = kwok_nodes.gpu_node("", "", 8).capacity
        kwok_nodes.add_kwok_nodes(cp, [kwok_nodes.NodeSpec(f"gpu-{i}", "gpu", capacity) for i in range(2)])
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        try:
            envtest.run_kubectl(kubectl, cp, "apply", "-f", str(REPO_ROOT / "crds"))
            # Poll rather than `kubectl wait`: right after apply the CRD may have no conditions
            # yet, which kubectl wait reports as an error instead of waiting.
            established = '{.status.conditions[?(@.type=="Established")].status}'
            envtest.wait_for(
                lambda: (
                    envtest.run_kubectl(
                        kubectl,
                        cp,
                        "get",
                        "crd/disaggregatedmodels.kvrelay.dev",
                        "-o",
                        f"jsonpath={established}",
                    ).strip()
                    == "True"
                ),
                timeout=60,
                interval=0.5,
                what="CRD Established",
            )
            yield envtest, kubectl, cp
        finally:
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous


def test_operator_scales_up_under_load_and_back_down_after_it(stack: Stack, control_plane: Any) -> None:
    from kopf.testing import KopfRunner
    from prometheus_client import REGISTRY

    envtest, kubectl, cp = control_plane

    def kc(*args: str) -> str:
        return envtest.run_kubectl(kubectl, cp, *args)

    def model_status() -> dict[str, Any]:
        return json.loads(kc("get", "dm", "auto", "-n", namespace, "-o", "json")).get("status", {})

    def replicas(role: str) -> int:
        return json.loads(kc("get", "deployment", f"auto-{role}", "-n", namespace, "-o", "json"))["spec"][
            "replicas"
        ]

    def ready(role: str) -> int:
        d = json.loads(kc("get", "deployment", f"auto-{role}", "-n", namespace, "-o", "json"))
        return (d.get("status") or {}).get("readyReplicas") or 0

    namespace = f"as-{os.getpid()}-{int(time.time()) % 100000}"
    kc("create", "namespace", namespace)
    cr = yaml.safe_load((REPO_ROOT / "examples" / "tiny.yaml").read_text())
    cr["metadata"]["name"] = "auto"
    cr["spec"]["model"]["servedName"] = stack.serve.model
    cr["spec"]["monitoring"] = {"interval": f"{SCRAPE_SECONDS}s"}
    for role in ("prefill", "decode"):
        cr["spec"][role].update(minReplicas=1, maxReplicas=4)
    # Profile seeds far below what the load needs, so the tiny CPU load asks for more replicas.
    cr["spec"]["autoscaling"] = {
        "mode": "auto", "intervalSeconds": 5, "scaleUpCooldownSeconds": 5, "scaleDownCooldownSeconds": 15,
        "prometheusUrl": stack.prometheus_url, "slo": {"ttftSeconds": 5.0, "itlSeconds": 1.0},
        "profile": {"prefillTokensPerSecond": 2.0, "decodeTokensPerSecond": 1.0},
    }  # fmt: skip
    args = ["run", "--standalone", "--namespace", namespace,
            "-m", "kvrelay_operator.handlers", "-m", "kvrelay_operator.autoscaler.kopf_timer"]  # fmt: skip
    with KopfRunner(args, timeout=60) as runner:
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        subprocess.run([str(kubectl), "apply", "-n", namespace, "-f", "-"], input=json.dumps(cr), text=True,
                       check=True, capture_output=True, env=env)  # fmt: skip
        envtest.wait_for(lambda: model_status().get("autoscaler"), timeout=60, what="a first decision")
        with Load(stack.serve):
            up = envtest.wait_for(
                lambda: (s := model_status()).get("prefill", {}).get("desiredReplicas", 1) >= 3 and s,
                timeout=90, interval=1.0, what="desiredReplicas raised under load",
            )  # fmt: skip
            envtest.wait_for(
                lambda: replicas("prefill") >= 3, timeout=30, interval=0.5, what="Deployment scaled"
            )
            # The controllers made the pods, the scheduler placed them and kwok made them Ready.
            envtest.wait_for(lambda: ready("prefill") >= 3, timeout=60, interval=0.5, what="pods Ready")
            assert "up: load needs" in up["autoscaler"]["reason"]
            assert up["autoscaler"]["inputs"]["prompt_tokens_per_second"] > 0
            raised = {role: up[role]["desiredReplicas"] for role in ("prefill", "decode")}
            gauge = REGISTRY.get_sample_value(
                "kvrelay_autoscaler_desired_replicas", {"model": stack.serve.model, "role": "prefill"}
            )
            assert gauge is not None and gauge >= 3

        # Load gone: after the scale-down cooldown and a window of quiet, replicas come down.
        def lowered() -> dict[str, Any] | None:
            status = model_status()
            return (
                status if status.get("prefill", {}).get("desiredReplicas", 99) < raised["prefill"] else None
            )

        down = envtest.wait_for(
            lowered, timeout=120, interval=1.0, what="desiredReplicas lowered after the load"
        )
        assert down["autoscaler"]["reason"].startswith("prefill: down: ")
        envtest.wait_for(lambda: replicas("prefill") < raised["prefill"], timeout=30, interval=0.5,
                         what="Deployment scaled down")  # fmt: skip
        events = json.loads(kc("get", "events", "-n", namespace, "-o", "json"))["items"]
        reasons = {e["reason"] for e in events}
        assert "AutoscalerDecision" in reasons, reasons
        ups = sum(
            sample.value
            for metric in REGISTRY.collect()
            if metric.name == "kvrelay_autoscaler_decisions"
            for sample in metric.samples
            if sample.name.endswith("_total")
            and sample.labels["model"] == stack.serve.model
            and (sample.labels["role"], sample.labels["direction"]) == ("prefill", "up")
        )
        assert ups >= 1
    assert runner.exception is None, runner.output[-3000:]
    assert "failed with an exception" not in runner.output, runner.output[-3000:]


def test_restarted_operator_continues_from_the_learned_state(
    stack: Stack, control_plane: Any, tmp_path: Path
) -> None:
    """A real operator process learns under load and is killed; a fresh process (empty memo, a new
    leader) reads status.autoscaler.state back and decides as the old one would have."""
    from kvrelay_operator import api
    from kvrelay_operator.autoscaler import persist
    from kvrelay_operator.autoscaler.decision_log import LogEntry, read_log
    from kvrelay_operator.autoscaler.kopf_timer import policy_config
    from operator_process import OperatorProcess

    envtest, kubectl, cp = control_plane
    namespace = f"asr-{os.getpid()}-{int(time.time()) % 100000}"
    envtest.run_kubectl(kubectl, cp, "create", "namespace", namespace)

    def saved_state() -> api.AutoscalerState | None:
        out = envtest.run_kubectl(kubectl, cp, "get", "dm", "learn", "-n", namespace, "-o", "json")
        state = ((json.loads(out).get("status") or {}).get("autoscaler") or {}).get("state")
        return None if state is None else api.AutoscalerState.model_validate(state)

    def entries(path: Path) -> list[LogEntry]:
        return read_log(path) if path.exists() else []

    cr = yaml.safe_load((REPO_ROOT / "examples" / "tiny.yaml").read_text())
    cr["metadata"]["name"] = "learn"
    cr["spec"]["model"]["servedName"] = stack.serve.model
    cr["spec"]["monitoring"] = {"interval": f"{SCRAPE_SECONDS}s"}
    # kwok's replicas are Ready but serve nothing: one prefill replica keeps its busy share (what
    # prefill capacity is learned from) that of the one real worker. Decode scales 1..4.
    cr["spec"]["prefill"].update(replicas=1, minReplicas=1, maxReplicas=1)
    cr["spec"]["decode"].update(minReplicas=1, maxReplicas=4)
    # Seeds well below what the CPU workers do, so what the autoscaler learns is far from them; an
    # ITL SLO near the tiny model's 10-20 ms steps (decode learns only from ITLs near the SLO).
    seeds = {"prefill": 1000.0, "decode": 200.0}
    cr["spec"]["autoscaling"] = {
        "mode": "auto", "intervalSeconds": 5, "scaleUpCooldownSeconds": 5, "scaleDownCooldownSeconds": 15,
        "prometheusUrl": stack.prometheus_url, "slo": {"ttftSeconds": 5.0, "itlSeconds": 0.025},
        "profile": {"prefillTokensPerSecond": seeds["prefill"], "decodeTokensPerSecond": seeds["decode"]},
    }  # fmt: skip
    config = policy_config(api.DisaggregatedModelSpec.model_validate(cr["spec"]))
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
    subprocess.run([str(kubectl), "apply", "-n", namespace, "-f", "-"], input=json.dumps(cr), text=True,
                   check=True, capture_output=True, env=env)  # fmt: skip

    log1, log2 = tmp_path / "decisions-1.jsonl", tmp_path / "decisions-2.jsonl"
    first = OperatorProcess(namespace, tmp_path / "operator-1.log", env={"KVRELAY_DECISION_LOG": str(log1)})
    second: OperatorProcess | None = None
    try:
        with Load(stack.serve):

            def learned() -> api.AutoscalerState | None:
                saved = saved_state()
                capacity = None if saved is None else saved.prefill.capacity_tokens_per_second
                return saved if capacity not in (None, seeds["prefill"]) else None

            learned_once = envtest.wait_for(
                learned, timeout=120, interval=0.5, what="learned capacity in status"
            )
            # Stop it right after a status write if one comes soon, so that what it holds in memory is
            # what status holds (without a material change the next write is the heartbeat's).
            with contextlib.suppress(TimeoutError):
                envtest.wait_for(lambda: saved_state() != learned_once, timeout=20, interval=0.2,
                                 what="the next status write")  # fmt: skip
            first.stop()  # SIGKILL: no goodbye, as in a crash or a lost node
            saved = saved_state()
            assert saved is not None

            # The first operator's memory after each decision, replayed from its decision log (the
            # policy is pure, so this is exact): status holds one of them, rounded.
            old, states = PolicyState(), []
            for entry in entries(log1):
                decision, old = decide(entry.snapshot, old, config, entry.decision.at)
                assert decision == entry.decision
                states.append(old)
            persisted = [state for state in states if persist.to_status(state) == saved]
            assert len(states) >= 2 and persisted

            second = OperatorProcess(namespace, tmp_path / "operator-2.log",
                                     env={"KVRELAY_DECISION_LOG": str(log2)})  # fmt: skip
            entry = envtest.wait_for(lambda: next(iter(entries(log2)), None), timeout=60, interval=0.5,
                                     what="the new operator's first decision")  # fmt: skip
        snapshot, decision, now = entry.snapshot, entry.decision, entry.decision.at

        # It continued from what status held, read back at its first decision ...
        restored, kept = persist.restore(saved, now, config), persist.from_status(saved)
        assert (restored.prefill, restored.decode) == (kept.prefill, kept.decode)
        assert restored.demand_history == kept.demand_history and restored.metrics_since is None
        again, _ = decide(snapshot, restored, config, now)
        assert again == decision
        assert "continues from its saved state" in second.log.read_text()
        # ... not from the profile: a fresh state decides from the seeds.
        learned_p = decision.inputs["prefill_capacity_tokens_per_second"]
        assert learned_p != seeds["prefill"]
        fresh, _ = decide(snapshot, PolicyState(), config, now)
        assert fresh.inputs["prefill_capacity_tokens_per_second"] != learned_p
        # The old operator's memory when it wrote that state (usually its last: it was stopped right
        # after a write) on the same snapshot decides the same, except that a restart may delay a
        # scale-down (it waits for a fresh window of metrics).
        continuing, _ = decide(snapshot, persisted[-1], config, now)
        for role in ("prefill", "decode"):
            mine, theirs = decision.role(role), continuing.role(role)  # type: ignore[arg-type]
            if theirs.direction == "down" and mine.direction == "none":
                continue
            assert (mine.replicas, mine.code) == (theirs.replicas, theirs.code), (mine.reason, theirs.reason)

        # And the new operator writes its first decision with the state it now holds.
        def rewritten() -> bool:
            state = saved_state()
            return state is not None and (state.last_metrics_at or 0.0) >= round(now, 3)

        envtest.wait_for(rewritten, timeout=30, interval=0.5, what="the new operator's first status write")
    finally:
        first.stop()
        if second is not None:
            second.stop()
