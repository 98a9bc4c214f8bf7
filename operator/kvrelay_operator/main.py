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
import socket
import sys
import threading
import uuid
from collections.abc import Sequence

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
    """Blocks until this replica holds the Lease, runs kopf, exits when the Lease is lost."""
    from kubernetes import config
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

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

    lock = LeaseLock(args.lease_name, args.lease_namespace, identity)
    election = electionconfig.Config(
        lock, lease_duration=args.lease_duration, renew_deadline=max(2, args.lease_duration * 2 // 3),
        retry_period=max(1, args.lease_duration // 5), onstarted_leading=lambda: run_kopf(args, stop),
        onstopped_leading=lost,
    )  # fmt: skip
    log.info("waiting for the Lease %s/%s as %s", args.lease_namespace, args.lease_name, identity)
    leaderelection.LeaderElection(election).run()


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
