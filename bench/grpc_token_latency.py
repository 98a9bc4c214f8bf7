"""gRPC overhead per streamed token: the worker's KServe v2 server over a no-op model, loopback.

Two servers run in child processes, measured by the same official client in this process:
- "worker": the real servicer + engine thread + bounded stream queue, with a no-op engine that
  emits one token per request per step;
- "bare": a minimal grpc.aio servicer that yields the same responses straight from the handler.
Figures (medians, microseconds): ping-pong round trip of a 1-token request on an open stream, and
inter-arrival of tokens within a 64-token stream. Prints one JSON line with ratios worker/bare.

    python bench/grpc_token_latency.py [--requests 300] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))


# ---- server side ------------------------------------------------------------------------------------
class NoopEngine:
    """The Engine surface the server uses, with no model: one token per request per step."""

    def __init__(self) -> None:
        from kvrelay_worker.engine.scheduler import RequestOutput

        self._output = RequestOutput
        self.active: dict[str, list[int]] = {}  # id -> [emitted, max]

        class _Sched:
            eos_token_ids: frozenset[int] = frozenset()

        self.scheduler = _Sched()

    def add_decode_request(self, rid, prompt, first, params, now, remote_kv=False) -> None:
        self.active[rid] = [1, params.max_tokens]

    def has_work(self) -> bool:
        return bool(self.active)

    def step(self, now: float):
        from kvrelay_worker.engine import StepResult

        outputs = []
        for rid, state in list(self.active.items()):
            state[0] += 1
            done = state[0] >= state[1]
            outputs.append(self._output(rid, [state[0]], done, "length" if done else None))
            if done:
                del self.active[rid]
        return StepResult(outputs, [], len(outputs))

    def abort(self, rid: str) -> bool:
        return self.active.pop(rid, None) is not None

    def stats(self):
        from kvrelay_worker.engine import EngineStats

        return EngineStats(len(self.active), 0, 0, 0.0, 0)


async def serve_worker(port: int) -> None:
    import grpc
    from kvrelay_worker.server.engine_loop import EngineLoop
    from kvrelay_worker.server.servicer import WorkerServicer
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    loop = asyncio.get_running_loop()
    engine_loop = EngineLoop(NoopEngine(), loop)  # type: ignore[arg-type]
    servicer = WorkerServicer("decode", engine_loop)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    engine_loop.start()
    await server.start()
    servicer.ready = True
    print("READY", flush=True)
    await server.wait_for_termination()


async def serve_bare(port: int) -> None:
    import grpc
    from kvrelay_worker.server.codec import infer_response, read_inputs
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    class Bare(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelStreamInfer(self, request_iterator, context):
            async for req in request_iterator:
                n = json.loads(read_inputs(req)["sampling"][0])["max_tokens"]
                for i in range(2, n + 1):
                    last = i == n
                    params = {"triton_final_response": last, **({"finish_reason": "length"} if last else {})}
                    yield pb.ModelStreamInferResponse(
                        infer_response=infer_response(req, {"token_id": [i]}, params=params)
                    )

    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("READY", flush=True)
    await server.wait_for_termination()


# ---- client side ------------------------------------------------------------------------------------
def measure(address: str, requests: int, tokens: int) -> dict[str, float]:
    from worker_fixtures import decode_inputs

    client = grpcclient.InferenceServerClient(address)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((time.perf_counter(), result, error)))

    def run(max_tokens: int) -> list[float]:
        t0 = time.perf_counter()
        client.async_stream_infer(
            "kvrelay_decode", decode_inputs(grpcclient, [5, 6, 7], 9, b"", max_tokens=max_tokens)
        )
        stamps = [t0]
        while True:
            t, result, error = q.get(timeout=30)
            if error is not None:
                raise RuntimeError(str(error))
            stamps.append(t)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return stamps

    try:
        for _ in range(20):  # warm-up
            run(2)
        rtt = [np.diff(run(2))[0] for _ in range(requests)]
        gaps: list[float] = []
        for _ in range(max(requests // 20, 5)):
            gaps.extend(np.diff(run(tokens + 1))[1:])  # between streamed tokens, not the first one
        return {"pingpong_us": statistics.median(rtt) * 1e6, "token_gap_us": statistics.median(gaps) * 1e6}
    finally:
        client.stop_stream()
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", choices=["worker", "bare"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve_worker(args.port) if args.serve == "worker" else serve_bare(args.port))
        return
    from kvrelay_worker.ports import free_port

    results = {}
    for kind in ("bare", "worker"):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and "READY" in proc.stdout.readline()
            results[kind] = measure(f"127.0.0.1:{port}", args.requests, args.tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    w, b = results["worker"], results["bare"]
    print(
        json.dumps(
            {
                "bench": "grpc_token_latency",
                "worker_pingpong_us": round(w["pingpong_us"], 1),
                "bare_pingpong_us": round(b["pingpong_us"], 1),
                "pingpong_ratio": round(w["pingpong_us"] / b["pingpong_us"], 3),
                "worker_token_gap_us": round(w["token_gap_us"], 1),
                "bare_token_gap_us": round(b["token_gap_us"], 1),
                "token_gap_ratio": round(w["token_gap_us"] / b["token_gap_us"], 3),
                "requests": args.requests,
                "tokens": args.tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
