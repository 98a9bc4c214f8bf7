"""Router overhead per token: inter-token latency through the router (HTTP SSE) vs the decode worker direct.

Both paths run against the same `kvrelay serve` (1 prefill + 1 decode worker, tiny model), 1 and then
16 concurrent streams, alternating paths, with identical prompt ids and greedy sampling. "Direct" calls
prefill then decode over KServe v2 gRPC exactly as the router does, minus HTTP, detokenization and SSE.
Prints one JSON line: per stream count, p50/p99 time per output token and ITL of each path, the added
time per token and the ratio.

    python bench/router_overhead.py [--requests 40] [--streams 1 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import httpx
from kvrelay_worker.router.kserve import WorkerClient
from router_common import launch_serve, quantile, summary_ms


async def direct(
    prefill: WorkerClient, decode: WorkerClient, ids: list[int], max_tokens: int
) -> tuple[list[float], float]:
    """(steady-state inter-token gaps, seconds per token after the first) calling the workers directly."""
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    rid = uuid.uuid4().hex
    first = await prefill.prefill(rid, ids, sampling)
    start = last = time.perf_counter()
    gaps = []
    async for _token in decode.decode(rid, ids, first.token_id, first.kv_handle, sampling):
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps[1:], (last - start) / (max_tokens - 1)  # gaps[0] includes the KV pull


async def via_router(
    http: httpx.AsyncClient, model: str, ids: list[int], max_tokens: int
) -> tuple[list[float], float]:
    """The same through the router's SSE (chunks can merge tokens that end mid-character)."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    gaps, start, last, seen = [], 0.0, 0.0, 0
    async with http.stream("POST", "/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            seen += 1
            if seen == 1:
                start = now
            elif seen > 2:  # skip the first decode gap (KV pull), as for direct
                gaps.append(now - last)
            last = now
    return gaps, (last - start) / (max_tokens - 1)


def _tpot(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(quantile(values, 0.99) * 1e3, 3),
    }


async def _measure(
    prefill: WorkerClient, decode: WorkerClient, http: httpx.AsyncClient, model: str,
    args: argparse.Namespace, concurrency: int,
) -> dict[str, object]:  # fmt: skip
    """`concurrency` simultaneous streams per round, rounds alternating which path goes first."""
    gaps: dict[str, list[float]] = {"direct": [], "router": []}
    tpot: dict[str, list[float]] = {"direct": [], "router": []}
    prompts = [[10 + (k * 7 + j) % 400 for j in range(args.prompt_tokens)] for k in range(concurrency)]
    rounds = max(2, args.requests // concurrency)
    for i in range(args.warmup + rounds):
        for path in ("direct", "router") if i % 2 else ("router", "direct"):
            if path == "direct":
                results = await asyncio.gather(
                    *(direct(prefill, decode, p, args.max_tokens) for p in prompts)
                )
            else:
                results = await asyncio.gather(
                    *(via_router(http, model, p, args.max_tokens) for p in prompts)
                )
            if i >= args.warmup:
                for g, t in results:
                    gaps[path] += g
                    tpot[path].append(t)
    d, r = _tpot(tpot["direct"]), _tpot(tpot["router"])
    return {
        "streams": concurrency,
        "requests": rounds * concurrency,
        "direct": {"per_token": d, "itl": summary_ms(gaps["direct"])},
        "router": {"per_token": r, "itl": summary_ms(gaps["router"])},
        "added_per_token_p50_ms": round(r["p50_ms"] - d["p50_ms"], 3),
        "added_per_token_p99_ms": round(r["p99_ms"] - d["p99_ms"], 3),
        "ratio_per_token_p50": round(r["p50_ms"] / d["p50_ms"], 3),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"bench": "router_overhead", "max_tokens": args.max_tokens}
    with launch_serve(["--model", "tiny", "--prefill", "1", "--decode", "1"]) as serve:
        prefill = WorkerClient(serve.workers["prefill-0"])
        decode = WorkerClient(serve.workers["decode-0"])
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=120) as http:
            for concurrency in args.streams:
                out[f"streams_{concurrency}"] = await _measure(
                    prefill, decode, http, serve.model, args, concurrency
                )
        await prefill.close()
        await decode.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per path and stream count")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16], help="concurrent streams")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
