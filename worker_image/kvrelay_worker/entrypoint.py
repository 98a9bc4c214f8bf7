"""``kvrelay-worker``: the worker image's one entrypoint (wire contract section 5)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from kvrelay_worker.tp.options import DEFAULT_TP_PORT, TPError, TPOptions, resolve

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
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch default, shared by ranks)"
    )
    tp = p.add_argument_group("tensor parallelism (prefill and decode roles)")
    tp.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        help="ranks (GPUs) per worker: one process each, rank 0 serves",
    )
    tp.add_argument(
        "--tp-nodes", type=int, default=1, help="pods the worker spans (each runs TP / nodes ranks)"
    )
    tp.add_argument(
        "--tp-node-rank", default="0", help="this pod's index in the group, or auto (LeaderWorkerSet)"
    )
    tp.add_argument(
        "--tp-leader-addr", default="127.0.0.1", help="rank 0's address, or auto (LeaderWorkerSet)"
    )
    tp.add_argument(
        "--tp-port", type=int, default=DEFAULT_TP_PORT, help="rendezvous port on rank 0 (+1: its link)"
    )
    tp.add_argument("--tp-rank", type=int, default=None, help=argparse.SUPPRESS)  # a started rank process
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

    placement = None
    if args.tensor_parallel > 1:
        if args.role == "colocated":
            build_parser().error(
                "the colocated role runs TP 1; serve TP > 1 with the prefill and decode roles"
            )
        try:
            node_rank = "auto" if args.tp_node_rank == "auto" else int(args.tp_node_rank)
            placement = resolve(
                TPOptions(
                    size=args.tensor_parallel, nodes=args.tp_nodes, node_rank=node_rank,
                    leader_addr=args.tp_leader_addr, port=args.tp_port,
                ),
                os.environ,
            )  # fmt: skip
        except (TPError, ValueError) as exc:
            build_parser().error(f"tensor parallelism: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif placement is not None:  # the pod's ranks share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // placement.ranks_per_node))
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
        tp=placement,
    )
    if placement is not None:
        from kvrelay_worker.tp import group
        from kvrelay_worker.tp.follower import run_follower

        try:
            group.authkey(placement, dict(os.environ))  # made up now, so the local ranks inherit it
        except TPError as exc:
            build_parser().error(f"tensor parallelism: {exc}")
        if args.tp_rank is not None:  # a rank process this pod's first process started
            group.die_with_parent()
            return run_follower(opts, placement, args.tp_rank, serve_http=False)
        children = group.spawn_local_ranks(placement, argv)
        stopping = group.watch_children(children, placement.local_ranks[1:])
        if placement.node_rank > 0:
            code = run_follower(opts, placement, placement.local_ranks[0], serve_http=True)
            stopping.set()
            return code
        asyncio.run(serve(opts))
        stopping.set()
        return 0
    asyncio.run(serve(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
