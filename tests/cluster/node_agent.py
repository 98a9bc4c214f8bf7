"""A TEST-ONLY node agent: a stand-in for the kubelet that runs one Node's pods as local processes.

It registers the Node, renews its Lease and Ready heartbeat, watches the pods bound to it and runs
each in its own network namespace on the cluster's bridge (see README.md in this directory).

    python tests/cluster/node_agent.py --kubeconfig K --node N --bridge kvrXXXXXX --pod-cidr 10.R.1.0/24
    with run_node_agent(kubeconfig, "node-1", network=net, node_index=1) as agent: ...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_config import AgentConfig, now_rfc3339
from kube_rest import MERGE, Rest, not_found
from pod_network import AddressPool, PodNetwork, cleanup, network_from_bridge, node_netns_prefix
from pod_worker import PodWorker

log = logging.getLogger("node_agent")
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
WATCH_TIMEOUT_S = 60
KUBELET_VERSION = "v1.36.3-kvrelay-test-agent"


class NodeAgent:
    """Owns one Node: registration, heartbeats, and a PodWorker per pod bound to it."""

    def __init__(
        self,
        config: AgentConfig,
        rest: Rest,
        labels: Mapping[str, str],
        taints: Sequence[dict[str, str]],
        capacity: Mapping[str, str],
        heartbeat_s: float = 10.0,
    ) -> None:
        self.config, self.rest = config, rest
        self.labels, self.taints, self.capacity = dict(labels), list(taints), dict(capacity)
        self.heartbeat_s = heartbeat_s
        self.pool = AddressPool(config.pod_cidr)
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # uids whose worker ended: later events must not restart them
        self._lock = threading.Lock()
        self._ready_since = now_rfc3339()

    # --- the Node and its heartbeats ---------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        now = now_rfc3339()
        node = self.config.node

        def condition(kind: str, status: str, reason: str, message: str, since: str) -> dict[str, str]:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": since}  # fmt: skip

        pressure = [
            condition(kind, "False", f"KubeletHasSufficient{what}", f"no {kind}", self._ready_since)
            for kind, what in (("MemoryPressure", "Memory"), ("DiskPressure", "Disk"), ("PIDPressure", "PID"))
        ]
        ready = condition(
            "Ready", "True", "KubeletReady", "kvrelay test node agent is ready", self._ready_since
        )
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [*pressure, ready],
            "addresses": [{"type": "InternalIP", "address": self.config.host_ip},
                          {"type": "Hostname", "address": node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": node, "systemUUID": node, "bootID": str(os.getpid()),
                "kernelVersion": platform.release(), "osImage": "kvrelay test node agent (host processes)",
                "containerRuntimeVersion": "kvrelay-node-agent://1", "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }  # fmt: skip

    def register(self) -> dict[str, Any]:
        """Creates the Node (or takes an existing one over): labels, taints, podCIDR, a Ready status."""
        node = self.config.node
        labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", **self.labels}  # fmt: skip
        spec = {"podCIDR": self.config.pod_cidr, "podCIDRs": [self.config.pod_cidr], "taints": self.taints}
        try:
            existing = self.rest.get(f"/api/v1/nodes/{node}")
        except Exception as exc:
            if not not_found(exc):
                raise
            manifest = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": labels},
                        "spec": spec, "status": self._node_status()}  # fmt: skip
            created = self.rest.post("/api/v1/nodes", manifest)
        else:
            cidr = existing.get("spec", {}).get("podCIDR")
            if cidr and cidr != self.config.pod_cidr:
                raise RuntimeError(
                    f"node {node} already has podCIDR {cidr} (immutable), not {self.config.pod_cidr}"
                )
            # Keep the taints others added (the lifecycle controller's unreachable ones lift themselves).
            taints = existing.get("spec", {}).get("taints") or []
            have = {(t["key"], t["effect"]) for t in taints}
            spec["taints"] = taints + [t for t in self.taints if (t["key"], t["effect"]) not in have]
            created = self.rest.patch(
                f"/api/v1/nodes/{node}", {"metadata": {"labels": labels}, "spec": spec}, MERGE
            )
        self._post_status(created)
        log.info(
            "node %s registered (podCIDR %s, host IP %s)", node, self.config.pod_cidr, self.config.host_ip
        )
        return created

    def _post_status(self, node: dict[str, Any]) -> None:
        ready = next(
            (c for c in (node.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {}
        )
        if ready.get("status") != "True":
            self._ready_since = now_rfc3339()  # e.g. the lifecycle controller marked it Unknown meanwhile
        self.rest.patch(f"/api/v1/nodes/{self.config.node}/status", {"status": self._node_status()}, MERGE)

    def _renew_lease(self, node_uid: str) -> None:
        node = self.config.node
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{node}"
        renew = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        try:
            lease = self.rest.get(path)
        except Exception as exc:
            if not not_found(exc):
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}
            self.rest.post(
                f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases",
                {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": node, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                 "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_DURATION_S,
                          "renewTime": renew}},
            )  # fmt: skip
            return
        lease["spec"].update(holderIdentity=node, leaseDurationSeconds=LEASE_DURATION_S, renewTime=renew)
        self.rest.put(path, lease)

    def heartbeat_loop(self, stop: threading.Event) -> None:
        """Renews the Lease and the Ready condition's heartbeat every heartbeat_s until stop."""
        while not stop.is_set():
            try:
                node = self.rest.get(f"/api/v1/nodes/{self.config.node}")
                self._renew_lease(node["metadata"]["uid"])
                self._post_status(node)
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            stop.wait(self.heartbeat_s)

    # --- pods ----------------------------------------------------------------------------------

    def _forget(self, uid: str) -> None:
        with self._lock:
            self.workers.pop(uid, None)
            self.finished.add(uid)

    def _delete_idle(self, pod: dict[str, Any]) -> None:
        # A terminating pod with nothing running here: finish its delete at once.
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        with contextlib.suppress(Exception):
            self.rest.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)

    def observe(self, pod: dict[str, Any]) -> None:
        """An ADDED/MODIFIED pod bound to this node: start a worker, or pass the new version to it."""
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            worker = self.workers.get(uid)
            finished = uid in self.finished
        if worker is not None:
            worker.update(pod)
            return
        if finished or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            if meta.get("deletionTimestamp"):
                self._delete_idle(pod)
            return
        if meta.get("deletionTimestamp"):
            self._delete_idle(pod)
            return
        worker = PodWorker(self.config, self.rest, self.pool, pod, self._forget)
        with self._lock:
            self.workers[uid] = worker
        log.info("pod %s/%s (%s): starting", meta["namespace"], meta["name"], uid)
        worker.start()

    def removed(self, uid: str) -> None:
        """The pod is gone from the API (force deleted, or the graceful delete finished)."""
        with self._lock:
            worker = self.workers.get(uid)
        if worker is not None:
            worker.gone()

    def _relist(self) -> str:
        selector = f"spec.nodeName={self.config.node}"
        listing = self.rest.get("/api/v1/pods", fieldSelector=selector)
        seen = set()
        for pod in listing.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            self._safely(self.observe, pod)
        with self._lock:
            missing = [uid for uid in self.workers if uid not in seen]
        for uid in missing:
            self.removed(uid)
        return str(listing["metadata"]["resourceVersion"])

    def _safely(self, handler: Any, *args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("handling %s failed", handler.__name__)

    def watch_loop(self, stop: threading.Event) -> None:
        """List + watch of the pods with spec.nodeName=<node>; re-lists after 410 Gone or any error."""
        version = ""
        while not stop.is_set():
            try:
                if not version:
                    version = self._relist()
                selector = f"spec.nodeName={self.config.node}"
                for event in self.rest.watch(
                    "/api/v1/pods", WATCH_TIMEOUT_S, fieldSelector=selector, resourceVersion=version
                ):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        log.info("watch error %s: re-listing", obj.get("code"))
                        version = ""
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if kind in ("ADDED", "MODIFIED"):
                        self._safely(self.observe, obj)
                    elif kind == "DELETED":
                        self._safely(self.removed, obj["metadata"]["uid"])
                    if stop.is_set():
                        return
            except Exception as exc:
                if stop.is_set():
                    return
                log.warning("pod watch failed (%s): re-listing", exc)
                version = ""
                stop.wait(1)

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Registers the Node, runs heartbeats and the pod watch until stop, then kills every pod."""
        self.register()
        node = self.rest.get(f"/api/v1/nodes/{self.config.node}")
        self._renew_lease(node["metadata"]["uid"])
        for target in (self.heartbeat_loop, self.watch_loop):
            threading.Thread(target=target, args=(stop,), name=target.__name__, daemon=True).start()
        stop.wait()
        self.shutdown()

    def shutdown(self) -> None:
        """Kills every pod's processes and removes their netns (the pod objects stay, as on a node crash)."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            worker.join(timeout=30)
        cleanup(node_netns_prefix(self.config.network.bridge, self.config.pod_cidr))
        log.info("node agent for %s stopped", self.config.node)


# --- command line ----------------------------------------------------------------------------------


def parse_pairs(items: Sequence[str], sep: str = "=") -> dict[str, str]:
    """["a=1", "b=2"] -> {"a": "1", "b": "2"}."""
    pairs = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY{sep}VALUE")
        pairs[key] = value
    return pairs


def parse_taint(text: str) -> dict[str, str]:
    """'key=value:Effect' or 'key:Effect' -> a Node taint."""
    head, _, effect = text.rpartition(":")
    if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not head:
        raise argparse.ArgumentTypeError(
            f"taint {text!r} is not key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
        )
    key, _, value = head.partition("=")
    return {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}


def default_capacity() -> dict[str, str]:
    """This host's CPUs and memory, and 110 pods (the kubelet's default)."""
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_kib}Ki", "pods": "110"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--node", required=True, help="the Node's name")
    p.add_argument("--bridge", required=True, help="the cluster's bridge (pod_network.create_pod_network)")
    p.add_argument("--pod-cidr", required=True, help="this node's /24 of the bridge's subnet")
    p.add_argument("--host-ip", help="the Node's InternalIP and pods' hostIP (default: the bridge's address)")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE, repeated")
    p.add_argument("--taint", action="append", default=[], type=parse_taint, help="KEY[=VALUE]:EFFECT")
    p.add_argument("--capacity", action="append", default=[], help="RESOURCE=QUANTITY, e.g. nvidia.com/gpu=8")
    p.add_argument("--state-dir", help="pods' volumes and sandboxes (default: a temp dir, removed on exit)")
    p.add_argument("--log-dir", help="one log file per container (default: <state-dir>/logs)")
    p.add_argument("--image-path-prepend", action="append", default=[], help="a dir put first on PATH")
    p.add_argument("--image-bind", action="append", default=[], help="SRC:DST, a host path at DST read-only")
    p.add_argument("--runtime-bind", action="append", default=[],
                   help="a host dir mounted read-only at its own path over all volumes")  # fmt: skip
    p.add_argument("--image-env", action="append", default=[], help="KEY=VALUE the 'image' sets")
    p.add_argument("--api-server-for-pods", help="https://HOST:PORT pods use (default: the kubeconfig's)")
    p.add_argument("--ca-file", help="ca.crt for pods' API access (default: the kubeconfig's CA)")
    p.add_argument("--max-probe-period-s", type=float, default=1.0)
    p.add_argument("--max-backoff-s", type=float, default=10.0)
    p.add_argument("--heartbeat-s", type=float, default=10.0)
    p.add_argument("--exit-with-parent", action="store_true", help="stop (cleanly) when the parent dies")
    return p


def _stop_when_orphaned(stop: threading.Event) -> None:
    # A killed test run must not leave an agent heartbeating (and its pods running) behind.
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("parent process %d is gone: stopping", parent)
            stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the agent until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    network = network_from_bridge(args.bridge)
    rest = Rest(args.kubeconfig)
    api = urllib.parse.urlsplit(args.api_server_for_pods or rest.server)
    own_state = args.state_dir is None
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix=f"{args.bridge}-{args.node}-"))
    log_dir = Path(args.log_dir) if args.log_dir else state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    capacity = {**default_capacity(), **parse_pairs(args.capacity)}
    config = AgentConfig(
        node=args.node, network=network, pod_cidr=args.pod_cidr, host_ip=args.host_ip or network.gateway,
        state_dir=state_dir, log_dir=log_dir, api_host=api.hostname or "", api_port=api.port or 443,
        ca_file=args.ca_file or rest.ca_file, image_path=args.image_path_prepend,
        image_binds=[tuple(b.split(":", 1)) for b in args.image_bind],  # type: ignore[misc]
        runtime_binds=list(args.runtime_bind),
        image_env=parse_pairs(args.image_env), allocatable=capacity,
        max_probe_period_s=args.max_probe_period_s, max_backoff_s=args.max_backoff_s,
    )  # fmt: skip
    agent = NodeAgent(config, rest, parse_pairs(args.label), args.taint, capacity, args.heartbeat_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_with_parent:
        threading.Thread(target=_stop_when_orphaned, args=(stop,), name="parent-watch", daemon=True).start()
    try:
        agent.run(stop)
    finally:
        if own_state:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


# --- Python API for tests ----------------------------------------------------------------------


@dataclass
class NodeAgentProcess:
    """A running agent subprocess and where its logs are."""

    node: str
    pod_cidr: str
    network: PodNetwork
    process: subprocess.Popen[bytes]
    log_dir: Path
    agent_log: Path

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """Everything the container wrote (all its restarts), '' if it never ran here."""
        path = self.log_dir / f"{namespace}_{pod}_{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def output(self, tail: int = 20000) -> str:
        """The agent's own log (the end of it)."""
        return self.agent_log.read_text(errors="replace")[-tail:] if self.agent_log.exists() else ""

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM (the agent kills its pods and tears their netns down), then SIGKILL after timeout_s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Whatever an agent that died on its own left behind.
        cleanup(node_netns_prefix(self.network.bridge, self.pod_cidr))
        return self.process.returncode

    def crash(self) -> None:
        """A node failure: SIGKILL the agent, kill its pods, remove their netns; the Node goes NotReady."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        cleanup(node_netns_prefix(self.network.bridge, self.pod_cidr))


def _node_ready(rest: Rest, node: str) -> bool:
    try:
        conditions = rest.get(f"/api/v1/nodes/{node}").get("status", {}).get("conditions") or []
    except Exception:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@contextlib.contextmanager
def run_node_agent(
    kubeconfig: str | Path,
    node: str,
    *,
    network: PodNetwork,
    node_index: int,
    labels: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
    capacity: Mapping[str, str] | None = None,
    image_path_prepend: Sequence[str] | None = None,
    image_binds: Sequence[tuple[str, str]] = (),
    image_env: Mapping[str, str] | None = None,
    log_dir: str | Path | None = None,
    api_server_for_pods: str | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 30.0,
) -> Iterator[NodeAgentProcess]:
    """Starts an agent for `node` (pod range network.node_cidr(node_index)) and waits until the Node is Ready.

    The "image" defaults to this host with the running interpreter's bin dir first on PATH. On exit
    the agent is stopped (its pods killed, their netns removed); the Node object is left behind.
    """
    if image_path_prepend is None:
        image_path_prepend = [str(Path(sys.executable).parent)]
    # The venv and the checkout it installs from (editable) are the "image"; a pod's /tmp is its
    # own (and may be an emptyDir), so where they live under /tmp (a CI clone under /tmp,
    # KVRELAY_VENV=/tmp/...) they are mounted over everything at their own paths.
    repo_root = Path(__file__).resolve().parents[2]
    hidden = [str(d) for d in (Path(sys.prefix), repo_root) if d.is_relative_to("/tmp")]
    own_logs = log_dir is None
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix=f"{network.bridge}-{node}-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    pod_cidr = network.node_cidr(node_index)
    # Ours, not the agent's: it must go even when the agent is SIGKILLed (crash()).
    state_dir = Path(tempfile.mkdtemp(prefix=f"{network.bridge}-{node}-state-"))
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--kubeconfig", str(kubeconfig), "--node", node,
        "--bridge", network.bridge, "--pod-cidr", pod_cidr,
        "--log-dir", str(logs), "--state-dir", str(state_dir), "--exit-with-parent",
        *[f"--label={k}={v}" for k, v in (labels or {}).items()],
        *[f"--capacity={k}={v}" for k, v in (capacity or {}).items()],
        *[f"--image-path-prepend={d}" for d in image_path_prepend],
        *[f"--image-bind={src}:{dst}" for src, dst in image_binds],
        *[f"--runtime-bind={d}" for d in hidden],
        *[f"--image-env={k}={v}" for k, v in (image_env or {}).items()],
        *(["--api-server-for-pods", api_server_for_pods] if api_server_for_pods else []),
        *extra_args,
    ]  # fmt: skip
    for taint in taints:
        value = f"={taint['value']}" if taint.get("value") else ""
        argv.append(f"--taint={taint['key']}{value}:{taint['effect']}")
    agent_log = logs / f"agent-{node}.log"
    with agent_log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    agent = NodeAgentProcess(node, pod_cidr, network, process, logs, agent_log)
    try:
        rest = Rest(str(kubeconfig))
        deadline = time.monotonic() + ready_timeout_s
        while not _node_ready(rest, node):
            if process.poll() is not None:
                raise RuntimeError(f"node agent {node} exited with {process.returncode}:\n{agent.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node} not Ready after {ready_timeout_s}s:\n{agent.output()}")
            time.sleep(0.2)
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
        if own_logs:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
