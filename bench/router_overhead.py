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


async def run(args: argparse.Namespace) -> dict[str, object]:
    with launch_serve(["--model", "tiny", "--prefill", "1", "--decode", "1"]) as serve:
        prefill = WorkerClient(serve.workers["prefill-0"])
        decode = WorkerClient(serve.workers["decode-0"])
        ids = list(range(10, 10 + args.prompt_tokens))
        gaps: dict[str, list[float]] = {"direct": [], "router": []}
        tpot: dict[str, list[float]] = {"direct": [], "router": []}
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=60) as http:
            for i in range(args.warmup + args.requests):
                # Alternate the order so neither path always runs right after the other.
                for path in ("direct", "router") if i % 2 else ("router", "direct"):
                    if path == "direct":
                        g, t = await direct(prefill, decode, ids, args.max_tokens)
                    else:
                        g, t = await via_router(http, serve.model, ids, args.max_tokens)
                    if i >= args.warmup:
                        gaps[path] += g
                        tpot[path].append(t)
        await prefill.close()
        await decode.close()
    d, r = _tpot(tpot["direct"]), _tpot(tpot["router"])
    return {
        "bench": "router_overhead",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "direct": {"per_token": d, "itl": summary_ms(gaps["direct"])},
        "router": {"per_token": r, "itl": summary_ms(gaps["router"])},
        "added_per_token_p50_ms": round(r["p50_ms"] - d["p50_ms"], 3),
        "added_per_token_p99_ms": round(r["p99_ms"] - d["p99_ms"], 3),
        "ratio_per_token_p50": round(r["p50_ms"] / d["p50_ms"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
