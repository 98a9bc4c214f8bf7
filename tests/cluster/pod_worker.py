"""One pod on the node, from its netns to its deletion: init containers, containers, status, teardown.

A worker thread per pod; only it writes the pod's status (a JSON merge patch of the whole status, so
lists such as containerStatuses are replaced, never merged entry by entry).
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from agent_config import AgentConfig, now_rfc3339
from kube_rest import MERGE, Rest, not_found, pod_path
from pod_container import ContainerRunner
from pod_network import AddressPool, create_pod_netns, delete_pod_netns
from pod_sandbox import Mount
from pod_volumes import VolumeError, prepare_volumes

log = logging.getLogger("node_agent.pod")
STATUS_REFRESH_S = 1.0
SHUTDOWN_GRACE_S = 2.0
OWN_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


class PodWorker:
    """Runs one pod (by uid) and reports its status until the pod is deleted or the agent stops."""

    def __init__(
        self,
        config: AgentConfig,
        rest: Rest,
        pool: AddressPool,
        pod: dict[str, Any],
        forget: Callable[[str], None],
    ) -> None:
        self.config, self.rest, self.pool, self._forget = config, rest, pool, forget
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.namespace}/{self.name}"
        self.pod = pod
        self.spec: dict[str, Any] = pod["spec"]
        self.pod_dir = config.state_dir / "pods" / self.uid
        self.ip: str | None = None
        self.netns = ""
        self.volumes: dict[str, str] = {}
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self._delete_grace: float | None = None  # set by a deletionTimestamp
        self._gone = False  # removed from the API (a force delete): nothing left to report
        self._shutdown = False  # the agent stops: kill, tear down, leave the API object alone
        self._failure = ""  # why the pod failed for good (its phase becomes Failed)
        self._conditions: dict[str, tuple[str, str]] = {}  # type -> (status, lastTransitionTime)
        self._last_status: dict[str, Any] | None = None
        self._start_time = now_rfc3339()
        has_init = bool(self.spec.get("initContainers"))
        self.init_runners = [
            ContainerRunner(
                self, c, "sidecar" if c.get("restartPolicy") == "Always" else "init", "PodInitializing"
            )
            for c in self.spec.get("initContainers") or []
        ]
        main_reason = "PodInitializing" if has_init else "ContainerCreating"
        self.runners = [ContainerRunner(self, c, "main", main_reason) for c in self.spec["containers"]]
        self._thread = threading.Thread(target=self._run, name=f"pod {self.key}", daemon=True)

    # --- called by the agent's watch -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def update(self, pod: dict[str, Any]) -> None:
        """A newer version of the pod from the API; a deletionTimestamp starts the graceful stop."""
        with self._lock:
            self.pod = pod
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            self.request_delete(float(meta.get("deletionGracePeriodSeconds", 30)))
        self.notify()

    def request_delete(self, grace_s: float) -> None:
        with self._lock:
            if self._delete_grace is None or grace_s < self._delete_grace:
                self._delete_grace = grace_s
        self.notify()

    def gone(self) -> None:
        """The pod was removed from the API: kill at once."""
        with self._lock:
            self._gone = True
        self.request_delete(0)

    def shutdown(self) -> None:
        """The agent stops: kill the pod's processes and tear down, without touching the API object."""
        with self._lock:
            self._shutdown = True
        self.request_delete(SHUTDOWN_GRACE_S)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def notify(self) -> None:
        self._changed.set()

    # --- helpers for the runners ---------------------------------------------------------------

    def pod_for_env(self) -> dict[str, Any]:
        """The pod with the addresses this agent gave it (the API copy may not show them yet)."""
        with self._lock:
            pod = copy.deepcopy(self.pod)
        status = pod.setdefault("status", {})
        status.update(self._addresses())
        return pod

    def _addresses(self) -> dict[str, Any]:
        addresses: dict[str, Any] = {"hostIP": self.config.host_ip, "hostIPs": [{"ip": self.config.host_ip}]}
        if self.ip:
            addresses.update(podIP=self.ip, podIPs=[{"ip": self.ip}])
        return addresses

    @property
    def deleting(self) -> bool:
        with self._lock:
            return self._delete_grace is not None

    # --- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._start_pod()
            while not self.deleting:
                self._wait_for_change()
                self._sync_status()
        except Exception as exc:
            log.exception("pod %s: failed", self.key)
            self._failure = f"node agent error: {exc}"
            self._sync_status()
            while not self.deleting:  # keep it visible as Failed until it is deleted
                self._wait_for_change()
        finally:
            self._finish()

    def _wait_for_change(self, timeout: float = STATUS_REFRESH_S) -> None:
        self._changed.wait(timeout)
        self._changed.clear()

    def _start_pod(self) -> None:
        """Sandbox, volumes, init containers in order, then the containers (each step waits for the last)."""
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        self.ip = self.pool.allocate()
        self.netns = create_pod_netns(self.config.network, self.ip)
        log.info("pod %s: sandbox %s with %s", self.key, self.netns, self.ip)
        self._write_name_files()
        self._sync_status()
        backoff = 1.0
        while not self.deleting:
            try:
                self.volumes = prepare_volumes(
                    self.rest, self.pod_for_env(), self.pod_dir, self.config.ca_file
                )
                break
            except VolumeError as exc:
                log.warning("pod %s: volumes not ready: %s", self.key, exc)
                self._wait_for_change(backoff)
                backoff = min(backoff * 2, self.config.max_backoff_s)
        for runner in self.init_runners:
            if self.deleting:
                return
            runner.start()
            # A sidecar (an init container with restartPolicy Always) only has to start; others must succeed.
            while not self.deleting and not runner.done.is_set():
                if runner.kind == "sidecar" and runner.started and "running" in runner.status()["state"]:
                    break
                self._wait_for_change()
                self._sync_status()
            if runner.kind == "init" and runner.exit_code != 0:
                self._failure = f"init container {runner.name} failed with exit code {runner.exit_code}"
                return
        if not self.deleting:
            for runner in self.runners:
                runner.start()
        self._sync_status()

    def hostname(self) -> str:
        return str(self.spec.get("hostname") or self.name)[:63]

    def _write_name_files(self) -> None:
        """The pod's /etc/hosts and /etc/resolv.conf, as the kubelet writes them (no cluster DNS here)."""
        hosts = "# Kubernetes-managed hosts file (kvrelay test node agent).\n127.0.0.1\tlocalhost\n"
        hosts += f"::1\tlocalhost ip6-localhost ip6-loopback\n{self.ip}\t{self.hostname()}\n"
        (self.pod_dir / "etc-hosts").write_text(hosts)
        # No nameserver: lookups go to 127.0.0.1 in the pod's netns and fail at once, instead of timing
        # out against the host's resolver, which pods cannot reach (Python's HTTPServer does one at bind).
        (self.pod_dir / "resolv.conf").write_text("# no cluster DNS in the kvrelay test cluster\n")

    def name_file_mounts(self) -> list[Mount]:
        """Bind mounts of the files from _write_name_files."""
        return [
            Mount(str(self.pod_dir / "etc-hosts"), "/etc/hosts", read_only=True),
            Mount(str(self.pod_dir / "resolv.conf"), "/etc/resolv.conf", read_only=True),
        ]

    def _finish(self) -> None:
        """Stop every container with the grace asked for, report, tear down, delete the pod object."""
        with self._lock:
            grace = self._delete_grace if self._delete_grace is not None else 0.0
            gone, shutdown = self._gone, self._shutdown
        runners = [*self.runners, *self.init_runners]
        for runner in runners:
            runner.stop(grace)
        for runner in runners:
            runner.join()
        try:
            if not gone and not shutdown:
                self._sync_status()
        except Exception:
            log.exception("pod %s: final status", self.key)
        if self.ip:
            delete_pod_netns(self.config.network.bridge, self.ip)
            self.pool.release(self.ip)
        shutil.rmtree(self.pod_dir, ignore_errors=True)
        if not gone and not shutdown:
            self._delete_object()
        log.info("pod %s: finished", self.key)
        self._forget(self.uid)

    def _delete_object(self) -> None:
        """What the kubelet does to finish a graceful delete: grace 0, only this incarnation (uid)."""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        for attempt in range(5):
            try:
                self.rest.delete(pod_path(self.namespace, self.name), body)
                return
            except Exception as exc:
                if not_found(exc) or getattr(exc, "status", 0) == 409:  # already gone / a newer pod
                    return
                log.warning("pod %s: delete failed (attempt %d): %s", self.key, attempt + 1, exc)
                time.sleep(1)

    # --- status ------------------------------------------------------------------------------

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        previous = self._conditions.get(kind)
        if previous is None or previous[0] != status:
            self._conditions[kind] = (status, now_rfc3339())
        condition = {"type": kind, "status": status, "lastTransitionTime": self._conditions[kind][1]}
        if not ok and reason:
            condition.update(reason=reason, message=message)
        return condition

    def _phase(self, initialized: bool, statuses: list[dict[str, Any]]) -> str:
        if self._failure:
            return "Failed"
        if not initialized:
            return "Pending"
        if all(r.done.is_set() for r in self.runners) and all(r.runs for r in self.runners):
            return "Succeeded" if all(r.exit_code == 0 for r in self.runners) else "Failed"
        if all("waiting" not in s["state"] or s["restartCount"] for s in statuses):
            return "Running"
        return "Pending"

    def build_status(self) -> dict[str, Any]:
        """The pod's status as the kubelet would report it now."""
        init_statuses = [r.status() for r in self.init_runners]
        statuses = [r.status() for r in self.runners]
        initialized = all(
            (r.kind == "sidecar" and r.started) or (r.done.is_set() and r.exit_code == 0)
            for r in self.init_runners
        )
        unready = [s["name"] for s in statuses if not s["ready"]]
        ready = not unready and initialized and not self.deleting
        message = f"containers with unready status: [{' '.join(unready)}]"
        with self._lock:
            others = [
                c
                for c in (self.pod.get("status") or {}).get("conditions") or []
                if c["type"] not in OWN_CONDITIONS
            ]
        if not any(c["type"] == "PodScheduled" for c in others):
            others.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": self._start_time})
        conditions = [
            *others,
            self._condition("PodReadyToStartContainers", bool(self.netns)),
            self._condition(
                "Initialized", initialized, "ContainersNotInitialized", "init containers pending"
            ),
            self._condition("ContainersReady", ready, "ContainersNotReady", message),
            self._condition("Ready", ready, "ContainersNotReady", message),
        ]
        status: dict[str, Any] = {
            "phase": self._phase(initialized, statuses),
            "conditions": conditions,
            "startTime": self._start_time,
            "containerStatuses": statuses,
            **self._addresses(),
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if self._failure:
            status.update(reason="Failed", message=self._failure)
        return status

    def _sync_status(self) -> None:
        """Patches the status subresource when it changed since the last patch."""
        with self._lock:
            if self._gone or self._shutdown:
                return
        status = self.build_status()
        if status == self._last_status:
            return
        try:
            # metadata.uid makes the patch fail (409) on a newer pod of the same name.
            body = {"metadata": {"uid": self.uid}, "status": status}
            updated = self.rest.patch(pod_path(self.namespace, self.name) + "/status", body, MERGE)
        except Exception as exc:
            if not not_found(exc) and getattr(exc, "status", 0) != 409:
                log.warning("pod %s: status patch failed: %s", self.key, exc)
            return
        self._last_status = status
        with self._lock:
            if updated.get("metadata", {}).get("uid") == self.uid:
                self.pod = updated
