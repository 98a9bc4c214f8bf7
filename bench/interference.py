"""Prefill/decode interference: decode inter-token latency while long prompts keep arriving.

(a) disaggregated: a prefill worker pinned to core 0 and a decode worker pinned to core 1 (KV relayed);
(b) colocated: one worker on both cores doing prefill and decode in one engine (`--role colocated`).
Same load in both: 16 greedy streams decoding continuously, plus 2,048-token-class prompts arriving
at a fixed rate (open loop). The client calls the workers over KServe v2 gRPC directly (no router),
so only the workers differ. Prints one JSON line: ITL p50/p99 of both and the ratios.

    python bench/interference.py [--duration 15] [--streams 16] [--prompt-tokens 2040] [--rate 1]
    # a model whose 2,048-token prefill costs seconds, not milliseconds, on this CPU:
    kvrelay-make-tiny-model /tmp/m100 --size 100m
    python bench/interference.py --model /tmp/m100 --rate 0.1 --streams 8 --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from kvrelay_worker.cli import (
    WorkerProcess,
    stop_workers,
    wait_ready,
    worker_command,
)
from kvrelay_worker.model_store import ensure_tiny_model
from kvrelay_worker.ports import free_ports
from kvrelay_worker.router.kserve import WorkerClient
from router_common import summary_ms


@contextlib.contextmanager
def pinned_workers(specs: list[tuple[str, str]], model: Path, log_dir: Path) -> Iterator[list[WorkerProcess]]:
    """Start `(role, cpu list)` workers under taskset; always stop them."""
    ports = free_ports(3 * len(specs))
    workers: list[WorkerProcess] = []
    try:
        for i, (role, cpus) in enumerate(specs):
            grpc_port, metrics_port, kv_port = ports[3 * i : 3 * i + 3]
            env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus.split(","))))
            log_path = log_dir / f"{role}-{i}.log"
            cmd = ["taskset", "-c", cpus, *worker_command(role, model, grpc_port, metrics_port, kv_port, [])]
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            workers.append(
                WorkerProcess(f"{role}-{i}", role, f"127.0.0.1:{grpc_port}", metrics_port, log_path, proc)
            )
        wait_ready(workers, 300)
        yield workers
    finally:
        stop_workers(workers)


async def measure(prefill_addr: str, decode_addr: str, args: argparse.Namespace) -> dict[str, object]:
    prefill, decode = WorkerClient(prefill_addr), WorkerClient(decode_addr)
    gaps: list[float] = []
    long_done = 0
    stop_at = time.monotonic() + args.duration

    async def one(ids: list[int], max_tokens: int, record: bool) -> None:
        sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        rid = uuid.uuid4().hex
        first = await prefill.prefill(rid, ids, sampling)
        if first.finish_reason:
            return
        # Gaps are timed on the monotonic clock; one that began inside the window counts in full,
        # and one still open when the run is cut off counts up to the cut (a lower bound).
        last, seen = time.monotonic(), 0
        try:
            async for _ in decode.decode(rid, ids, first.token_id, first.kv_handle, sampling):
                now = time.monotonic()
                seen += 1
                if record and seen > 1 and last < stop_at:  # seen 1: the gap holding the KV pull
                    gaps.append(now - last)
                last = now
        except asyncio.CancelledError:
            if record and seen >= 1 and last < stop_at:
                gaps.append(time.monotonic() - last)
            raise

    async def stream_loop(i: int) -> None:
        while time.monotonic() < stop_at:
            await one([10 + (i * 13 + j) % 400 for j in range(32)], args.stream_tokens, record=True)

    async def long_prompts() -> None:
        nonlocal long_done
        tasks: list[asyncio.Task[None]] = []
        while time.monotonic() < stop_at:
            n = len(tasks)
            ids = [5 + (n * 31 + j) % 500 for j in range(args.prompt_tokens)]
            tasks.append(asyncio.create_task(one(ids, 4, record=False)))
            await asyncio.sleep(1.0 / args.rate)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        long_done = sum(1 for r in results if not isinstance(r, BaseException))

    # Warm up both paths once (first calls fault in memory and fill allocator caches).
    await one(list(range(10, 42)), 8, record=False)
    await one([5 + j % 500 for j in range(args.prompt_tokens)], 4, record=False)
    stop_at = time.monotonic() + args.duration
    tasks = [asyncio.create_task(long_prompts())]
    tasks += [asyncio.create_task(stream_loop(i)) for i in range(args.streams)]
    # Bounded: a worker that stalls under this load is reported, not waited on forever.
    _, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await prefill.close()
    await decode.close()
    return {
        "itl": summary_ms(gaps),
        "decode_tokens_per_s": round(len(gaps) / args.duration, 1),  # the 16 streams' steady-state tokens
        "long_prompts_done": long_done,
        "stalled": bool(pending),
    }


def _ratio(num: dict[str, float], den: dict[str, float], key: str) -> float | None:
    """None when either side produced no samples (a stalled configuration)."""
    if key not in num or key not in den or den[key] == 0:
        return None
    return round(num[key] / den[key], 3)


def _raise_keyboard_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per configuration")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=128, help="tokens per decode stream request")
    parser.add_argument("--prompt-tokens", type=int, default=2040, help="long prompt length (tiny: <= 2044)")
    parser.add_argument("--rate", type=float, default=1.0, help="long prompts per second (open loop)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to let in-flight work finish")
    parser.add_argument("--log-dir", default="/tmp/kvrelay-interference")
    parser.add_argument("--model", default="tiny", help="checkpoint directory, or tiny (built on first use)")
    args = parser.parse_args()
    # SIGTERM (e.g. `timeout`) must unwind like Ctrl-C so the workers are stopped.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    model = ensure_tiny_model() if args.model == "tiny" else Path(args.model)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with pinned_workers([("prefill", "0"), ("decode", "1")], model, log_dir) as (p, d):
        disagg = asyncio.run(measure(p.grpc_address, d.grpc_address, args))
    with pinned_workers([("colocated", "0,1")], model, log_dir) as (c,):
        coloc = asyncio.run(measure(c.grpc_address, c.grpc_address, args))
    a, b = disagg["itl"], coloc["itl"]
    print(
        json.dumps(
            {
                "bench": "interference",
                "model": args.model,
                "streams": args.streams,
                "prompt_tokens": args.prompt_tokens,
                "rate_per_s": args.rate,
                "duration_s": args.duration,
                "disaggregated": disagg,
                "colocated": coloc,
                "ratio_p50_colocated_over_disagg": _ratio(b, a, "p50_ms"),
                "ratio_p99_colocated_over_disagg": _ratio(b, a, "p99_ms"),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
