"""``kvrelay-worker``: the worker image's one entrypoint (wire contract section 5)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

ROLES = ("prefill", "decode", "colocated", "router")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvrelay-worker",
        description="kvrelay worker: prefill or decode engine over KServe v2 gRPC, or the OpenAI router.",
    )
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--model", help="Hugging Face checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--served-model-name", help="model id in the KV layout and metrics (default: dir name)")
    p.add_argument("--host", default=os.environ.get("KVRELAY_HOST", "127.0.0.1"), help="bind address")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port (0: off)")
    p.add_argument("--kv-backend", choices=["nixl", "tcp", "none"], default="nixl")
    p.add_argument("--kv-host", default=None, help="KV control endpoint bind address (default: --host)")
    p.add_argument("--kv-advertise-host", default=os.environ.get("POD_IP"), help="address put in KV handles")
    p.add_argument("--kv-port", type=int, default=0)
    p.add_argument("--kv-failure-policy", choices=["recompute", "fail"], default="recompute")
    p.add_argument("--kv-lease-s", type=float, default=30.0)
    p.add_argument(
        "--kv-fetch-timeout-s", type=float, default=30.0, help="deadline of one KV fetch (decode side)"
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=120.0,
        help="on SIGTERM: stop admitting, finish running requests and serve held KV for up to this long, "
        "then end what is left and exit 0 (a second SIGTERM/SIGINT cuts it short)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="decode batch: running sequences at most")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per step at most")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-blocks", type=int, default=1024, help="KV cache blocks (block 0 is reserved)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the KV of full prompt blocks after a request ends and reuse it for a later request "
        "with the same prefix (evicted least recently used first when blocks run short)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--role")
    if pre.parse_known_args(argv)[0].role == "router":  # the router owns all its other flags, --help too
        from kvrelay_worker.router import main as router_main

        router_argv = [a for a in argv if a not in ("--role", "router") and not a.startswith("--role=")]
        router_main(router_argv)
        return 0
    args = build_parser().parse_args(argv)
    if not args.model:
        build_parser().error("--model is required for the prefill, decode and colocated roles")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from kvrelay_worker.engine import EngineConfig
    from kvrelay_worker.server.app import WorkerOptions, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = WorkerOptions(
        role=args.role,
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        kv_backend=args.kv_backend,
        kv_host=args.kv_host or args.host,
        kv_advertise_host=args.kv_advertise_host,
        kv_port=args.kv_port,
        kv_failure_policy=args.kv_failure_policy,
        kv_lease_s=args.kv_lease_s,
        kv_fetch_timeout_s=args.kv_fetch_timeout_s,
        drain_seconds=args.drain_seconds,
        engine=EngineConfig(
            num_blocks=args.num_blocks,
            block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            max_num_seqs=args.max_num_seqs,
            max_batch_tokens=args.max_batch_tokens,
            max_model_len=args.max_model_len,
            device=device,
            dtype=args.dtype,
        ),
    )
    asyncio.run(serve(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
