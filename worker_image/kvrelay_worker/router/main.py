"""`kvrelay-worker --role router` and `python -m kvrelay_worker.router`: flags -> config -> uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from kvrelay_worker.router.config import RouterConfig, model_max_len
from kvrelay_worker.router.discovery import Discovery, EndpointSliceDiscovery, StaticDiscovery

log = logging.getLogger("kvrelay.router")
API_KEY_ENV = "KVRELAY_API_KEY"
API_KEY_FILE_ENV = "KVRELAY_API_KEY_FILE"
MAX_WAITING_ENV = "KVRELAY_MAX_WAITING_REQUESTS"
MAX_WAIT_ENV = "KVRELAY_MAX_WAIT_SECONDS"
GRACEFUL_SHUTDOWN_S = 10


def _addresses(values: Sequence[str]) -> list[str]:
    """Flags may repeat and/or hold comma-separated lists."""
    return [a.strip() for v in values for a in v.split(",") if a.strip()]


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: shared worker flags such as --grpc-port must not match --grpc-port-name.
    p = argparse.ArgumentParser(
        prog="kvrelay-router", description="OpenAI-compatible router for kvrelay workers", allow_abbrev=False
    )
    p.add_argument("--model", required=True, help="checkpoint directory (tokenizer + config files)")
    p.add_argument("--served-model-name", help="model name clients send (default: directory name)")
    p.add_argument("--max-model-len", type=int, help="context length (default: config.json)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", "--http-port", dest="port", type=int, default=8000)
    p.add_argument(
        "--prefill", action="append", default=[], help="prefill worker host:port (repeat or comma list)"
    )
    p.add_argument(
        "--decode", action="append", default=[], help="decode worker host:port (repeat or comma list)"
    )
    p.add_argument("--discovery", choices=["static", "kubernetes"], default="static")
    p.add_argument("--namespace", help="kubernetes discovery namespace (default: the pod's own)")
    p.add_argument("--instance", help="kubernetes discovery: DisaggregatedModel name")
    p.add_argument("--grpc-port-name", default="grpc")
    p.add_argument(
        "--api-key-file",
        default=os.environ.get(API_KEY_FILE_ENV),
        help=f"file holding the API key (e.g. a mounted Secret); or set {API_KEY_ENV}",
    )
    p.add_argument(
        "--metrics-port", type=int, default=0, help="also serve /metrics on this port (0: only on --port)"
    )
    p.add_argument(
        "--decode-idle-timeout",
        type=float,
        default=120.0,
        help="seconds without a token before the request resumes on another decode worker",
    )
    p.add_argument(
        "--max-migrations",
        type=int,
        default=3,
        help="times one request may resume on another decode worker before it ends with an error",
    )
    p.add_argument(
        "--resume-via",
        choices=["prefill", "decode"],
        default="prefill",
        help="a resumed request's KV is recomputed by a prefill worker and relayed, or by the decode worker",
    )
    p.add_argument(
        "--prefix-weight",
        type=float,
        default=1.0,
        help="prefill routing: a prompt goes to the worker with the fewest queued tokens minus this weight "
        "times the prompt tokens it likely holds in its prefix cache (0: fewest queued tokens only)",
    )
    p.add_argument(
        "--decode-prefix-weight",
        type=float,
        default=2.0,
        help="decode routing: a stream goes to the decode worker with the fewest running streams minus this "
        "weight times the share of its input that worker likely holds; a worker holding the whole prompt "
        "counts as running W fewer streams (0: fewest running streams only)",
    )
    # String defaults go through `type` like a given flag, so a bad environment value is a clear error.
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=os.environ.get(MAX_WAITING_ENV, "256"),
        help="scale to zero: requests held at once while a role they need (prefill, decode) has no ready "
        f"worker; one more gets a 503 no_ready_replicas with Retry-After (or set {MAX_WAITING_ENV})",
    )
    p.add_argument(
        "--max-wait-seconds",
        type=float,
        default=os.environ.get(MAX_WAIT_ENV, "60"),
        help="scale to zero: how long a request is held for a ready worker of every role it needs before "
        f"a 503 no_ready_replicas with Retry-After; 0: no holding, a 503 at once (or set {MAX_WAIT_ENV})",
    )
    p.add_argument("--kv-block-size", type=int, default=16, help="the workers' --block-size (prefix hashes)")
    p.add_argument(
        "--prefix-index-blocks",
        type=int,
        default=1024,
        help="prefix blocks remembered per worker (prefill and decode each), least recently routed forgotten "
        "first (about the worker's --num-blocks)",
    )
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    model_dir = Path(args.model)
    key = os.environ.get(API_KEY_ENV) or None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip() or None
    return RouterConfig(
        model_dir=model_dir,
        served_model_name=args.served_model_name or model_dir.resolve().name,
        max_model_len=args.max_model_len or model_max_len(model_dir),
        discovery=args.discovery,
        prefill=_addresses(args.prefill),
        decode=_addresses(args.decode),
        namespace=args.namespace,
        instance=args.instance,
        grpc_port_name=args.grpc_port_name,
        api_key=SecretStr(key) if key else None,
        decode_idle_timeout_s=args.decode_idle_timeout,
        max_migrations=args.max_migrations,
        resume_via=args.resume_via,
        max_waiting_requests=args.max_waiting_requests,
        max_wait_s=args.max_wait_seconds,
        prefix_weight=args.prefix_weight,
        decode_prefix_weight=args.decode_prefix_weight,
        kv_block_size=args.kv_block_size,
        prefix_index_blocks=args.prefix_index_blocks,
    )


def make_discovery(config: RouterConfig) -> Discovery:
    if config.discovery == "kubernetes":
        if not config.instance:
            raise SystemExit("--discovery kubernetes needs --instance <DisaggregatedModel name>")
        return EndpointSliceDiscovery(config.instance, config.namespace, config.grpc_port_name)
    if not config.prefill or not config.decode:
        raise SystemExit("static discovery needs at least one --prefill and one --decode address")
    return StaticDiscovery(config.prefill, config.decode)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the router until SIGINT/SIGTERM. Unknown flags (shared worker flags) are ignored with a warning."""
    import uvicorn
    from prometheus_client import start_http_server

    from kvrelay_worker.router.app import create_app

    args, unknown = build_parser().parse_known_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if unknown:
        log.warning("ignoring flags the router does not use: %s", " ".join(unknown))
    config = config_from_args(args)
    app = create_app(config, make_discovery(config))
    if args.metrics_port and args.metrics_port != args.port:
        # Pods are scraped on their `metrics` port (the operator's PodMonitor), the router's included.
        start_http_server(args.metrics_port, addr=args.host, registry=app.state.router.metrics.registry)
    # Without a bound, shutdown would wait for every open stream to finish (a long generation).
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )  # fmt: skip


if __name__ == "__main__":
    main()
