"""`kvrelay serve`: router + N prefill + M decode workers as local processes, no cluster needed.

The serve process itself runs the router (torch-free); the workers are `kvrelay-worker` child
processes in their own session, so a terminal Ctrl-C reaches only us and we stop them in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model_store import CACHE_DIR, NAMED_MODELS, is_checkpoint_dir, resolve_model
from .ports import free_port_pair, free_ports

DEFAULT_MODEL = "smollm2"
DRAIN_CUT_S = 1.0  # how long stop_workers lets a worker drain before cutting it short
STOP_GRACE_S = 10.0
GRACEFUL_SHUTDOWN_S = 3  # open streams get this long after Ctrl-C, then are cut


def _log(message: str) -> None:
    print(f"kvrelay: {message}", flush=True)


def _die_with_parent() -> None:
    """Child pre-exec: get SIGTERM when the serve process dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class WorkerProcess:
    name: str
    role: str
    grpc_address: str
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def worker_command(
    role: str, model: Path, grpc_port: int, metrics_port: int, kv_port: int, extra: Sequence[str]
) -> list[str]:
    """The contract's worker command line (docs/wire-contracts.md section 5)."""
    code = "import sys; from kvrelay_worker.entrypoint import main; sys.exit(main(sys.argv[1:]))"
    return [
        sys.executable, "-c", code,
        "--role", role, "--model", str(model),
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--kv-port", str(kv_port),
        *extra,
    ]  # fmt: skip


def start_workers(
    args: argparse.Namespace, model: Path, log_dir: Path, served_name: str
) -> list[WorkerProcess]:
    roles = ["prefill"] * args.prefill + ["decode"] * args.decode
    ports = free_ports(3 * len(roles))
    env = dict(os.environ)
    # Each torch worker would otherwise spawn one thread per core and fight its neighbours.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(roles))))
    # The same model name everywhere: it labels worker metrics and is the KV layout's model id.
    extra = ["--served-model-name", served_name]
    if args.kv_backend:
        extra += ["--kv-backend", args.kv_backend]
    workers: list[WorkerProcess] = []
    counts = {"prefill": 0, "decode": 0}
    for i, role in enumerate(roles):
        name = f"{role}-{counts[role]}"
        counts[role] += 1
        grpc_port, metrics_port, kv_port = ports[3 * i : 3 * i + 3]
        log_path = log_dir / f"{name}.log"
        tp = args.prefill_tensor_parallel if role == "prefill" else args.decode_tensor_parallel
        role_extra = list(extra)
        if tp > 1:
            # Rank r's KV port is --kv-port + r, which free_ports did not reserve: let each rank pick one.
            kv_port = 0
            role_extra += ["--tensor-parallel", str(tp), "--tp-port", str(free_port_pair())]
        command = worker_command(
            role, model, grpc_port, metrics_port, kv_port, [*role_extra, *args.worker_arg]
        )
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        worker = WorkerProcess(name, role, f"127.0.0.1:{grpc_port}", metrics_port, log_path, proc)
        workers.append(worker)
        _log(
            f"worker {name} pid={proc.pid} grpc={worker.grpc_address} metrics=:{metrics_port} log={log_path}"
        )
    return workers


def wait_ready(workers: Sequence[WorkerProcess], timeout_s: float) -> None:
    """Poll ServerReady on every worker; fail fast (with its log) if one exits."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    clients = {w.name: grpcclient.InferenceServerClient(w.grpc_address) for w in workers}
    pending = {w.name: w for w in workers}
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            for name, worker in list(pending.items()):
                if worker.proc.poll() is not None:
                    raise RuntimeError(
                        f"worker {name} exited with code {worker.proc.returncode} during start-up; "
                        f"last lines of {worker.log_path}:\n{worker.log_tail()}"
                    )
                with contextlib.suppress(InferenceServerException, OSError):
                    if clients[name].is_server_ready(client_timeout=1.0):
                        del pending[name]
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after {timeout_s:.0f} s: {', '.join(pending)}")
            if pending:
                time.sleep(0.25)
    finally:
        for client in clients.values():
            client.close()


def stop_workers(workers: Sequence[WorkerProcess]) -> None:
    """SIGTERM all; a second SIGTERM after a moment cuts their drain short; then SIGKILL stragglers.

    The router has stopped by now, so nobody is left to read what a drain would keep (unclaimed
    KV, streams): waiting out a worker's drain deadline would only delay Ctrl-C.
    """
    for signal_round in range(2):
        for w in workers:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        if signal_round == 0:
            deadline = time.monotonic() + DRAIN_CUT_S
            while time.monotonic() < deadline and any(w.proc.poll() is None for w in workers):
                time.sleep(0.05)
    deadline = time.monotonic() + STOP_GRACE_S
    for w in workers:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _log(f"worker {w.name} ignored SIGTERM; killing it")
            w.proc.kill()
            w.proc.wait()


def bind_listener(host: str, port: int) -> socket.socket:
    """The router's listening socket, bound before any worker starts so a busy port fails fast."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def _run_router(
    args: argparse.Namespace,
    model: Path,
    served_name: str,
    workers: Sequence[WorkerProcess],
    listener: socket.socket,
) -> None:
    import uvicorn

    from kvrelay_worker.router.main import build_parser, config_from_args, make_discovery

    router_argv = ["--model", str(model), "--served-model-name", served_name, "--host", args.host]
    # Nothing scales a local pool up, so holding a request for a ready worker would only delay its 503
    # (--router-arg=--max-wait-seconds=N turns it on).
    router_argv += ["--max-wait-seconds", "0"]
    router_argv += [f"--prefill={w.grpc_address}" for w in workers if w.role == "prefill"]
    router_argv += [f"--decode={w.grpc_address}" for w in workers if w.role == "decode"]
    if args.api_key_file:
        router_argv += ["--api-key-file", args.api_key_file]
    if args.max_model_len:
        router_argv += ["--max-model-len", str(args.max_model_len)]
    config = config_from_args(build_parser().parse_args(router_argv + list(args.router_arg)))

    from kvrelay_worker.router.app import create_app

    app = create_app(config, make_discovery(config))
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )  # fmt: skip
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        if task.done():
            await task
            raise RuntimeError(f"the router could not start on {args.host}:{args.port}")
        await asyncio.sleep(0.05)
    port = listener.getsockname()[1]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    _log(f"serving model '{served_name}' at http://{host}:{port}/v1  (Ctrl-C to stop)")
    watch = asyncio.create_task(_watch_workers(workers))
    try:
        await task
    finally:
        watch.cancel()


async def _watch_workers(workers: Sequence[WorkerProcess]) -> None:
    """Say so when a worker dies; the router stops routing to it by itself."""
    reported: set[str] = set()
    while True:
        for w in workers:
            if w.name not in reported and w.proc.poll() is not None:
                reported.add(w.name)
                _log(f"worker {w.name} exited with code {w.proc.returncode}; log: {w.log_path}")
        await asyncio.sleep(1.0)


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(args: argparse.Namespace) -> int:
    if args.prefill_tensor_parallel < 1 or args.decode_tensor_parallel < 1:
        raise SystemExit("kvrelay serve: --prefill-tensor-parallel and --decode-tensor-parallel must be >= 1")
    if args.prefill < 1 or args.decode < 1:
        _log("--prefill and --decode must each be at least 1")
        return 2
    named = args.model in NAMED_MODELS
    source = Path(args.model).expanduser()
    if not named and not (source.suffix == ".gguf" and source.is_file()) and not is_checkpoint_dir(source):
        _log(
            f"{args.model}: not a named model ({', '.join(NAMED_MODELS)}), a .gguf file, or a checkpoint "
            "directory (config.json, tokenizer.json, *.safetensors)"
        )
        return 2
    # Before uvicorn takes over the signals, SIGTERM should unwind like Ctrl-C (and stop the workers).
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # The in-process router logs worker health changes and mid-stream failures: show those.
    logging.basicConfig(level=logging.WARNING, format="kvrelay router: %(levelname)s %(message)s")
    workers: list[WorkerProcess] = []
    try:
        listener = bind_listener(args.host, args.port)
    except OSError as exc:
        _log(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        signal.signal(signal.SIGTERM, previous)
        return 1
    try:
        model = resolve_model(args.model)
        served_name = args.served_model_name or (args.model if named else source.stem)
        log_dir = Path(args.log_dir or CACHE_DIR / "logs" / time.strftime("serve-%Y%m%d-%H%M%S"))
        log_dir.mkdir(parents=True, exist_ok=True)
        workers = start_workers(args, model, log_dir, served_name)
        wait_ready(workers, args.ready_timeout)
        _log(f"{args.prefill} prefill + {args.decode} decode worker(s) ready")
        asyncio.run(_run_router(args, model, served_name, workers, listener))
        return 0
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        _log(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        if workers:
            _log("stopping workers")
            stop_workers(workers)
        signal.signal(signal.SIGTERM, previous)
        listener.close()
        _log("stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrelay", description="kvrelay: disaggregated prefill/decode serving"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model disaggregated on this machine (router + workers)")
    s.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="smollm2 (SmolLM2-135M-Instruct, fetched and imported on first use), tiny (random weights, "
        "for tests), a .gguf file (imported once), or a Hugging Face checkpoint directory",
    )
    s.add_argument(
        "--served-model-name", help="model name for clients (default: the model's name or file/dir name)"
    )
    s.add_argument("--prefill", type=int, default=1, help="prefill worker processes")
    s.add_argument("--decode", type=int, default=1, help="decode worker processes")
    s.add_argument(
        "--prefill-tensor-parallel", type=int, default=1, help="ranks per prefill worker (one process each)"
    )
    s.add_argument(
        "--decode-tensor-parallel", type=int, default=1, help="ranks per decode worker (one process each)"
    )
    s.add_argument("--host", default="127.0.0.1", help="router listen address")
    s.add_argument("--port", type=int, default=8000, help="router port (0: any free port)")
    s.add_argument("--max-model-len", type=int, help="context length (default: the checkpoint's)")
    s.add_argument(
        "--kv-backend", choices=["nixl", "tcp"], help="KV transfer backend (default: the worker's)"
    )
    s.add_argument("--api-key-file", help="require this API key (file content) from clients")
    s.add_argument("--log-dir", help="worker logs (default: ~/.cache/kvrelay/logs/serve-<time>)")
    s.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for workers")
    s.add_argument("--worker-arg", action="append", default=[], help="extra flag passed to every worker")
    s.add_argument(
        "--router-arg", action="append", default=[], help="extra router flag (--router-arg=--prefix-weight=0)"
    )
    prof = sub.add_parser(
        "profile",
        help="measure what one prefill and one decode replica sustain within the SLOs "
        "(spec.autoscaling.profile)",
    )
    from kvrelay_worker.profile import add_arguments

    add_arguments(prof)
    i = sub.add_parser(
        "import-gguf", help="convert a llama.cpp GGUF file into a checkpoint directory", add_help=False
    )
    i.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import-gguf"]:  # its own parser (and --help): the importer is torch-free
        from kvrelay_worker.model.gguf_import import main as import_main

        sys.exit(import_main(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        sys.exit(serve(args))
    if args.command == "profile":
        from kvrelay_worker.profile import main as profile_main

        sys.exit(profile_main(args))


if __name__ == "__main__":
    main()
