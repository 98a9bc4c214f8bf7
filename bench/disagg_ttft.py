"""Added latency of disaggregated serving vs one process, 2,048-token prompt, ~100M checkpoint.

Starts real workers: one `colocated` worker (prefill and decode in one process; the KV cache is
handed over in memory) and a `prefill` + `decode` pair relaying the KV cache over --kv-backend.
Each request is driven over KServe gRPC the way the router does it: prefill (returns the first
token: TTFT) then a decode stream (its first token is the second token; it waits for the KV relay).
Requests alternate between the two setups (all three workers run at once) so both see the same
load. Prints one JSON line: median TTFT of each and the added TTFT, and the median first-to-second
token gap of each (a decode step; plus the KV relay when disaggregated) and their difference.

    python bench/disagg_ttft.py [--iters 3] [--kv-backend nixl|tcp] [--prompt-tokens 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from kvrelay_worker.model.tiny import make_tiny_model
from kvrelay_worker.ports import free_port
from kvrelay_worker.processes import stop_process

READY = re.compile(r"READY role=(\S+) grpc=(\S+)")


@contextlib.contextmanager
def worker(role: str, model: Path, backend: str, threads: int, blocks: int) -> Iterator[str]:
    """A real worker process; yields its gRPC address once READY, always stops it."""
    script = Path(sys.executable).with_name("kvrelay-worker")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "kvrelay_worker.entrypoint"]
    cmd = [
        *head, "--role", role, "--model", str(model), "--grpc-port", str(free_port()),
        "--metrics-port", "0", "--kv-backend", backend, "--threads", str(threads),
        "--num-blocks", str(blocks), "--max-batch-tokens", "4096",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    addr: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = READY.search(line)
            if m:
                addr.put(m[2])

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield addr.get(timeout=180)
    finally:
        stop_process(proc, grace_s=15)


def _input(name: str, data: np.ndarray, dtype: str) -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, list(data.shape), dtype)
    x.set_data_from_numpy(data)
    return x


def one_request(prefill_addr: str, decode_addr: str, prompt: list[int]) -> tuple[float, float]:
    """(time to first token, time to second token) for one greedy request."""
    sampling = np.array([json.dumps({"max_tokens": 2, "ignore_eos": True}).encode()], dtype=np.object_)
    ids = np.asarray(prompt, dtype=np.int64)
    pre, dec = grpcclient.InferenceServerClient(prefill_addr), grpcclient.InferenceServerClient(decode_addr)
    replies: queue.Queue = queue.Queue()
    dec.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        t0 = time.perf_counter()
        res = pre.infer(
            "kvrelay_prefill", [_input("input_ids", ids, "INT64"), _input("sampling", sampling, "BYTES")]
        )
        ttft = time.perf_counter() - t0
        first, handle = res.as_numpy("token_id")[:1], res.as_numpy("kv_handle")
        inputs = [
            _input("input_ids", ids, "INT64"),
            _input("first_token", first.astype(np.int64), "INT64"),
            _input("kv_handle", handle.astype(np.object_), "BYTES"),
            _input("sampling", sampling, "BYTES"),
        ]
        dec.async_stream_infer("kvrelay_decode", inputs)
        _, error = replies.get(timeout=300)
        if error is not None:
            raise RuntimeError(f"decode failed: {error}")
        return ttft, time.perf_counter() - t0
    finally:
        dec.stop_stream()


def measure(pairs: dict[str, tuple[str, str]], prompt: list[int], iters: int) -> dict[str, list[tuple]]:
    """Alternate the setups request by request so both see the same machine load."""
    for prefill_addr, decode_addr in pairs.values():
        one_request(prefill_addr, decode_addr, prompt)  # warm-up: first-use allocations, UCX wire-up
    runs: dict[str, list[tuple]] = {name: [] for name in pairs}
    for _ in range(iters):
        for name, (prefill_addr, decode_addr) in pairs.items():
            runs[name].append(one_request(prefill_addr, decode_addr, prompt))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--kv-backend", default="nixl", choices=["nixl", "tcp"])
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--size", default="100m", help="kvrelay-make-tiny-model size")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args()
    blocks = args.prompt_tokens // 16 + 16
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", size=args.size)
        prompt = [random.Random(0).randrange(10, 500) for _ in range(args.prompt_tokens)]
        with (
            worker("colocated", model, args.kv_backend, args.threads, 2 * blocks) as colo,
            worker("prefill", model, args.kv_backend, args.threads, blocks) as pre,
            worker("decode", model, args.kv_backend, args.threads, blocks) as dec,
        ):
            runs = measure({"single": (colo, colo), "disagg": (pre, dec)}, prompt, args.iters)
    med = {
        name: {
            "ttft": statistics.median(r[0] for r in rs),
            # first -> second token: a decode step, plus the KV relay when disaggregated
            "gap": statistics.median(r[1] - r[0] for r in rs),
        }
        for name, rs in runs.items()
    }
    single, disagg = med["single"], med["disagg"]
    result = {
        "bench": "disagg_ttft",
        "model": args.size,
        "prompt_tokens": args.prompt_tokens,
        "kv_backend": args.kv_backend,
        "iters": args.iters,
        "single_ttft_s": round(single["ttft"], 4),
        "disagg_ttft_s": round(disagg["ttft"], 4),
        "added_ttft_s": round(disagg["ttft"] - single["ttft"], 4),
        "ratio_ttft": round(disagg["ttft"] / single["ttft"], 3),
        "single_second_token_gap_s": round(single["gap"], 4),
        "disagg_second_token_gap_s": round(disagg["gap"], 4),
        "added_by_kv_relay_s": round(disagg["gap"] - single["gap"], 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
