"""`kvrelay-operator`: runs the kopf handlers, namespace-scoped or cluster-wide, behind a Lease.

Leader election uses a coordination.k8s.io Lease (not kopf peering, whose equal-priority peers
both keep acting): only the holder runs kopf; losing the Lease stops the process so that a
deposed leader can never act alongside the new one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("kvrelay_operator")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="kvrelay-operator", description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port (autoscaler series); 0: off"
    )
    parser.add_argument(
        "--worker-image", default=os.environ.get("KVRELAY_WORKER_IMAGE"), help="default image"
    )
    parser.add_argument("--prometheus-url", default=os.environ.get("KVRELAY_PROMETHEUS_URL"))
    parser.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lease-name", default="kvrelay-operator")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    parser.add_argument("--lease-duration", type=int, default=15, help="seconds")
    parser.add_argument(
        "--lease-retry-period",
        type=float,
        default=1.0,
        help="seconds between a standby's tries for the Lease (and the leader's renewals)",
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=20.0, help="seconds kopf may take to stop on SIGTERM"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


HANDLER_MODULES = ("kvrelay_operator.handlers", "kvrelay_operator.autoscaler.kopf_timer")


def load_handlers() -> None:
    """Registers the kopf handlers and the autoscaler's timer; exits non-zero if either fails to import.

    The autoscaler is part of the operator, not an option: an operator running without it would
    leave every `autoscaling.mode: auto` model at a fixed size while reporting nothing wrong.
    """
    for module in HANDLER_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            log.critical("cannot load %s: %s (install kvrelay[operator])", module, exc)
            raise SystemExit(f"kvrelay-operator: cannot load {module}: {exc}") from exc


def run_kopf(args: argparse.Namespace, stop_flag: threading.Event | None = None) -> None:
    """Runs kopf until stop_flag is set (or forever)."""
    import kopf

    load_handlers()
    namespaces = args.namespace or (
        [] if args.all_namespaces else [os.environ.get("POD_NAMESPACE", "default")]
    )
    asyncio.run(
        kopf.operator(
            standalone=True,  # leader election is ours: see the module docstring
            clusterwide=args.all_namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
            stop_flag=stop_flag,
        )
    )


def run_with_lease(args: argparse.Namespace) -> None:
    """Blocks until this replica holds the Lease, runs kopf, exits when the Lease is lost.

    SIGTERM/SIGINT (a rolling update, a drain) hand over at once: kopf's handlers stop, the Lease is
    released while still held (renewed meanwhile, so no one else acts until kopf has stopped), and the
    process exits 0. A standby then takes the Lease at its next try, not after the lease duration.
    """
    from kubernetes import client, config
    from kubernetes.leaderelection import electionconfig, leaderelection

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    stop = threading.Event()

    def lost() -> None:
        log.error("lost the Lease %s/%s: stopping", args.lease_namespace, args.lease_name)
        stop.set()
        os._exit(1)  # a deposed leader must not act; the pod restarts as a follower

    lock = lease_lock(args.lease_name, args.lease_namespace, identity)
    leading, kopf_done = threading.Event(), threading.Event()

    def lead() -> None:
        leading.set()
        try:
            run_kopf(args, stop)
        finally:
            kopf_done.set()

    election = electionconfig.Config(
        lock, lease_duration=args.lease_duration, renew_deadline=max(2, args.lease_duration * 2 // 3),
        retry_period=args.lease_retry_period, onstarted_leading=lead, onstopped_leading=lost,
    )  # fmt: skip
    elector = leaderelection.LeaderElection(election)

    def on_signal(signum: int, _frame: object) -> None:
        # Runs on the main thread, which is otherwise in the library's acquire or renew loop.
        if not leading.is_set():
            log.info("signal %d as a follower: exiting", signum)
            os._exit(0)
        log.info("signal %d: stopping kopf, then releasing the Lease", signum)
        stop.set()
        deadline = time.monotonic() + args.shutdown_timeout
        while not kopf_done.wait(timeout=min(1.0, args.lease_retry_period)):
            if time.monotonic() > deadline:
                log.error("kopf did not stop in %ss: exiting, Lease not released", args.shutdown_timeout)
                os._exit(1)
            if not elector.try_acquire_or_renew():  # keep the Lease until kopf has let go
                log.error("lost the Lease while stopping")
                os._exit(1)
        released = release_lease(client.CoordinationV1Api(), args.lease_namespace, args.lease_name, identity)
        log.info("stopped; Lease %s", "released" if released else "not ours any more")
        logging.shutdown()  # os._exit skips it: flush the log lines above
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("waiting for the Lease %s/%s as %s", args.lease_namespace, args.lease_name, identity)
    try:
        elector.run()
    except Exception:
        # Ending only this thread would leave kopf running in its own, with the Lease no longer renewed.
        log.exception("leader election failed: exiting")
        logging.shutdown()
        os._exit(1)


def lease_lock(name: str, namespace: str, identity: str) -> Any:
    """The kubernetes client's LeaseLock, except that an API server it cannot reach (restarting, a
    connection reset) is a failed try, as an API error is.

    The library's lock catches only ApiException: anything else raised out of its renew loop ended
    the main thread while kopf ran on in its own, a process that neither renewed the Lease nor
    stopped. Now the loop retries until its renew deadline, as after any failed renewal, and only
    then stops leading (onstopped_leading: the process exits). Each failed try is logged, and so is
    the first answer after them."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock
    from urllib3.exceptions import HTTPError

    class TolerantLeaseLock(LeaseLock):  # type: ignore[misc]
        unreachable_since: float | None = None

        def _unreachable(self, what: str, exc: Exception) -> ApiException:
            log.warning("cannot reach the API server to %s the Lease: %s", what, exc)
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
            return ApiException(status=0, reason=f"API server unreachable: {exc}")

        def get(self, name: str, namespace: str) -> tuple[bool, Any]:
            try:
                found = super().get(name, namespace)
            except HTTPError as exc:
                return False, self._unreachable("read", exc)
            if self.unreachable_since is not None:
                log.info("the API server answers again, %.1fs after it could not be reached",
                         time.monotonic() - self.unreachable_since)  # fmt: skip
                self.unreachable_since = None
            return found

        def create(self, name: str, namespace: str, election_record: Any) -> bool:
            try:
                return super().create(name, namespace, election_record)
            except HTTPError as exc:
                self._unreachable("create", exc)
                return False

        def update(self, name: str, namespace: str, updated_record: Any) -> bool:
            try:
                return super().update(name, namespace, updated_record)
            except HTTPError as exc:
                self._unreachable("renew", exc)
                return False

    return TolerantLeaseLock(name, namespace, identity)


def release_lease(coordination: Any, namespace: str, name: str, identity: str) -> bool:
    """Clears the Lease's holder if it is still `identity` (conditional on the version read)."""
    from kubernetes.client.exceptions import ApiException

    try:
        lease = coordination.read_namespaced_lease(name, namespace)
        if lease.spec.holder_identity != identity:
            return False
        # No holder: a waiting candidate takes the Lease at its next try (kubernetes' Python client
        # and client-go both treat an empty holder as free), instead of waiting out the duration.
        lease.spec.holder_identity = None
        coordination.replace_namespaced_lease(name, namespace, lease)
        return True
    except ApiException as exc:
        log.warning("could not release the Lease: %s %s", exc.status, exc.reason)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the kvrelay-operator console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.worker_image:
        os.environ["KVRELAY_WORKER_IMAGE"] = args.worker_image
    if args.prometheus_url:
        os.environ["KVRELAY_PROMETHEUS_URL"] = args.prometheus_url
    load_handlers()  # before serving /metrics, so the autoscaler's series are registered
    if args.metrics_port:
        from prometheus_client import start_http_server

        # Every replica serves it (followers report nothing), so the chart's scrape target always answers.
        start_http_server(args.metrics_port)
    if args.leader_elect:
        run_with_lease(args)
        return 1  # run() only returns when leading ended
    run_kopf(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
