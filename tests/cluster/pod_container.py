"""One container of a pod, across its restarts: start it in the sandbox, probe it, restart it, stop it.

Only the runner's own thread starts, signals and reaps the process (so a pid is never signalled after
it was reaped and reused); other threads ask through `stop()`. The thread that starts a process also
outlives it, which matters because the sandbox sets PDEATHSIG, which fires when that thread exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_config import now_rfc3339
from pod_env import ConfigError, command_line, container_env
from pod_probes import ExecFn, Prober, run_probe
from pod_sandbox import Mount, SandboxSpec, exec_argv, launch_argv
from pod_volumes import VolumeError, container_mounts, read_only_volumes

if TYPE_CHECKING:
    from pod_worker import PodWorker

log = logging.getLogger("node_agent.container")
POLL_S = 0.1
FIRST_BACKOFF_S = 1.0


class ContainerRunner:
    """A container's process and the status the kubelet would report for it."""

    def __init__(self, pod: PodWorker, spec: dict[str, Any], kind: str, waiting_reason: str) -> None:
        self.pod, self.spec, self.kind = pod, spec, kind  # kind: "init", "sidecar" or "main"
        self.name: str = spec["name"]
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_deadline: float | None = None  # monotonic time to SIGKILL by, once stopping
        self.restart_count = 0
        self.runs = 0  # processes started (restart_count counts the restarts after the first)
        self.ready = False
        self.started = False
        self.exit_code: int | None = None
        self.state: dict[str, Any] = {"waiting": {"reason": waiting_reason}}
        self.last_state: dict[str, Any] = {}
        self.done = threading.Event()  # set when no process runs and none will be started again
        self._thread = threading.Thread(target=self._run, name=f"{pod.key}/{self.name}", daemon=True)

    # --- asked by the pod worker -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """SIGTERM now, SIGKILL after grace_s (a later, shorter grace wins); no restart follows."""
        deadline = time.monotonic() + max(grace_s, 0.0)
        with self._lock:
            if self._stop_deadline is None or deadline < self._stop_deadline:
                self._stop_deadline = deadline
        self._wake.set()
        if not self._thread.is_alive() and not self._thread.ident:
            self.done.set()  # never started

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stop_deadline is not None

    def status(self) -> dict[str, Any]:
        """This container's entry of containerStatuses / initContainerStatuses."""
        with self._lock:
            status = {
                "name": self.name,
                "image": self.spec.get("image", ""),
                "imageID": "",
                "ready": self.ready,
                "started": self.started,
                "restartCount": self.restart_count,
                "state": self.state,
                "lastState": self.last_state,
            }
            if self.runs:
                status["containerID"] = f"kvrelay-node-agent://{self.pod.uid}/{self.name}/{self.runs}"
            return status

    # --- the runner thread -------------------------------------------------------------------

    def _set(self, **fields: Any) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(self, key, value)
        self.pod.notify()

    def _restart_wanted(self, code: int) -> bool:
        policy = self.pod.spec.get("restartPolicy", "Always")
        if self.kind == "sidecar":
            return True
        if self.kind == "init":
            return code != 0 and policy != "Never"
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _run(self) -> None:
        backoff = FIRST_BACKOFF_S
        try:
            while not self.stopping:
                started = time.monotonic()
                code = self._run_once()
                if code is None:  # could not start: a config error, retried
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.pod.config.max_backoff_s)
                    continue
                if self.stopping or not self._restart_wanted(code):
                    break
                if time.monotonic() - started > 2 * self.pod.config.max_backoff_s:
                    backoff = FIRST_BACKOFF_S  # it ran fine for a while: a fresh crash starts over
                with self._lock:
                    self.last_state = self.state
                    message = f"back-off {backoff:.0f}s restarting failed container={self.name}"
                    self.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
                self.pod.notify()
                self._sleep(backoff)
                backoff = min(backoff * 2, self.pod.config.max_backoff_s)
                if not self.stopping:
                    self._set(restart_count=self.restart_count + 1)
        except Exception:
            log.exception("container %s/%s: runner failed", self.pod.key, self.name)
        finally:
            self.done.set()
            self.pod.notify()

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _prepare(self, run_dir: Path) -> tuple[list[str], dict[str, str]]:
        """The sandbox spec for one run, written to run_dir; returns (launch argv, container env)."""
        cfg, pod = self.pod.config, self.pod.pod_for_env()
        env = container_env(self.pod.rest, pod, self.spec, cfg.service_environment(), cfg.allocatable)
        argv = command_line(self.spec, env)
        hostname = self.pod.hostname()
        full_env = {**cfg.image_environment(), "HOSTNAME": hostname, **env}
        image_mounts = [Mount(src, dst, read_only=True) for src, dst in cfg.image_binds]
        mounts = self.pod.name_file_mounts()
        mounts += container_mounts(self.spec, self.pod.volumes, read_only_volumes(pod))
        (run_dir / "root").mkdir(parents=True)
        (run_dir / "tmp").mkdir(mode=0o1777)
        (run_dir / "tmp").chmod(0o1777)
        sandbox = SandboxSpec(
            root=str(run_dir / "root"), tmp=str(run_dir / "tmp"), hostname=hostname, argv=argv,
            env=full_env, cwd=self.spec.get("workingDir") or "/",
            image_mounts=image_mounts, mounts=mounts,
            runtime_mounts=[Mount(d, d, read_only=True) for d in cfg.runtime_binds],
        )  # fmt: skip
        sandbox.write(run_dir / "sandbox.json")
        return launch_argv(self.pod.netns, run_dir / "sandbox.json", cfg.python), full_env

    def _run_once(self) -> int | None:
        """Starts the process, supervises it until it exits; its exit code (None if it never started)."""
        run_dir = self.pod.pod_dir / "containers" / f"{self.name}-{self.runs + 1}"
        try:
            argv, env = self._prepare(run_dir)
        except (ConfigError, VolumeError, OSError) as exc:
            log.warning("container %s/%s cannot start: %s", self.pod.key, self.name, exc)
            shutil.rmtree(run_dir, ignore_errors=True)
            reason = "CreateContainerConfigError" if isinstance(exc, ConfigError) else "CreateContainerError"
            self._set(state={"waiting": {"reason": reason, "message": str(exc)}})
            return None
        log_path = self.pod.config.log_dir / f"{self.pod.key.replace('/', '_')}_{self.name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started_at = now_rfc3339()
        log.info("container %s/%s started (pid %d)", self.pod.key, self.name, proc.pid)
        self._set(
            runs=self.runs + 1, exit_code=None, started=False, ready=False,
            state={"running": {"startedAt": started_at}},
        )  # fmt: skip
        try:
            code = self._supervise(proc, env)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what the container's main process left behind
            shutil.rmtree(run_dir, ignore_errors=True)
        log.info("container %s/%s exited with %d", self.pod.key, self.name, code)
        terminated = {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "startedAt": started_at, "finishedAt": now_rfc3339(),
            "containerID": f"kvrelay-node-agent://{self.pod.uid}/{self.name}/{self.runs}",
        }  # fmt: skip
        if code > 128:
            terminated["signal"] = code - 128
        self._set(exit_code=code, ready=False, state={"terminated": terminated})
        return code

    def _supervise(self, proc: subprocess.Popen[bytes], env: dict[str, str]) -> int:
        """Waits for the process while running its probes; SIGTERM/SIGKILL it when asked or unhealthy."""
        cfg, now = self.pod.config, time.monotonic()
        probes = {
            kind: Prober(self.spec[key], now, cfg.max_probe_period_s, initial)
            for kind, key, initial in (
                ("startup", "startupProbe", None), ("readiness", "readinessProbe", False),
                ("liveness", "livenessProbe", True),
            )
            if self.spec.get(key) and self.kind != "init"
        }  # fmt: skip
        started = "startup" not in probes
        self._set(started=started, ready=started and "readiness" not in probes and self.kind != "init")
        kill_at: float | None = None  # once set: SIGTERM sent, SIGKILL due at this time
        pod_grace = float(self.pod.spec.get("terminationGracePeriodSeconds", 30))

        def exec_fn(command: list[str], timeout: float) -> int:
            result = subprocess.run(
                exec_argv(proc.pid, command), env=env, capture_output=True, timeout=timeout
            )
            return result.returncode

        while True:
            try:
                return _exit_code(proc.wait(timeout=POLL_S))
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            with self._lock:
                stop_at = self._stop_deadline
            if stop_at is not None and (kill_at is None or stop_at < kill_at):
                if kill_at is None:
                    _signal(proc, signal.SIGTERM)
                kill_at = stop_at
            if kill_at is not None:
                if now >= kill_at:
                    _signal(proc, signal.SIGKILL)
                continue
            unhealthy = self._probe(probes, exec_fn, now, started)
            started = self.started
            if unhealthy:
                grace = float(probes[unhealthy].probe.get("terminationGracePeriodSeconds", pod_grace))
                log.warning(
                    "container %s/%s failed its %s probe: restarting", self.pod.key, self.name, unhealthy
                )
                _signal(proc, signal.SIGTERM)
                kill_at = now + grace

    def _probe(self, probes: dict[str, Prober], exec_fn: ExecFn, now: float, started: bool) -> str:
        """Runs the probes that are due; returns the kind of a probe that calls for a restart, or ''."""
        pod_ip = self.pod.ip or ""
        if not started:
            startup = probes["startup"]
            if startup.due(now):
                startup.record(*run_probe(startup.probe, self.spec, pod_ip, exec_fn), time.monotonic())
                if startup.result:
                    self._set(started=True, ready="readiness" not in probes)
                elif startup.result is False:
                    return "startup"
            return ""
        if (liveness := probes.get("liveness")) and liveness.due(now):
            liveness.record(*run_probe(liveness.probe, self.spec, pod_ip, exec_fn), time.monotonic())
            if liveness.result is False:
                return "liveness"
        if (readiness := probes.get("readiness")) and readiness.due(now):
            readiness.record(*run_probe(readiness.probe, self.spec, pod_ip, exec_fn), time.monotonic())
            if bool(readiness.result) != self.ready:
                message = readiness.message
                log.info("container %s/%s ready=%s (%s)", self.pod.key, self.name, readiness.result, message)
                self._set(ready=bool(readiness.result))
        return ""


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The whole process group: the container's children go too, as with a container's PID namespace.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _exit_code(returncode: int) -> int:
    # Popen reports death by signal N as -N; the kubelet reports 128 + N.
    return 128 - returncode if returncode < 0 else returncode
