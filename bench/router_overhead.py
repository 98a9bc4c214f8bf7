"""Router overhead per token: inter-token latency through the router (HTTP SSE) vs the decode worker direct.

Both paths run against the same `kvrelay serve` (1 prefill + 1 decode worker, tiny model), one stream
at a time, alternating, with identical prompt ids and greedy sampling. "Direct" calls prefill then
decode over KServe v2 gRPC exactly as the router does, minus HTTP, detokenization and SSE.
Prints one JSON line: p50/p99 ITL of each path, the added latency and the ratio.

    python bench/router_overhead.py [--requests 20] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import httpx
from kvrelay_worker.router.kserve import WorkerClient
from router_common import launch_serve, quantile, summary_ms


async def direct(prefill: WorkerClient, decode: WorkerClient, ids: list[int], max_tokens: int) -> list[float]:
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    rid = uuid.uuid4().hex
    first = await prefill.prefill(rid, ids, sampling)
    gaps, last = [], time.perf_counter()
    async for _token in decode.decode(rid, ids, first.token_id, first.kv_handle, sampling):
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps[1:]  # the first gap includes the KV pull, not a steady-state token


async def via_router(http: httpx.AsyncClient, model: str, ids: list[int], max_tokens: int) -> list[float]:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    gaps, last, seen = [], 0.0, 0
    async with http.stream("POST", "/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            seen += 1
            if seen > 2:  # skip the first token (prefill) and the first decode gap (KV pull)
                gaps.append(now - last)
            last = now
    return gaps


async def run(args: argparse.Namespace) -> dict[str, object]:
    with launch_serve(["--model", "tiny", "--prefill", "1", "--decode", "1"]) as serve:
        prefill = WorkerClient(serve.workers["prefill-0"])
        decode = WorkerClient(serve.workers["decode-0"])
        ids = list(range(10, 10 + args.prompt_tokens))
        direct_gaps: list[float] = []
        router_gaps: list[float] = []
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=60) as http:
            for _ in range(args.warmup):
                await direct(prefill, decode, ids, args.max_tokens)
                await via_router(http, serve.model, ids, args.max_tokens)
            for _ in range(args.requests):
                direct_gaps += await direct(prefill, decode, ids, args.max_tokens)
                router_gaps += await via_router(http, serve.model, ids, args.max_tokens)
        await prefill.close()
        await decode.close()
    d, r = summary_ms(direct_gaps), summary_ms(router_gaps)
    return {
        "bench": "router_overhead",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "direct_itl": d,
        "router_itl": r,
        "added_p50_ms": round(r["p50_ms"] - d["p50_ms"], 3),
        "added_p99_ms": round((quantile(router_gaps, 0.99) - quantile(direct_gaps, 0.99)) * 1e3, 3),
        "ratio_p50": round(r["p50_ms"] / d["p50_ms"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
