"""TTFT and ITL of `kvrelay serve` (1 prefill + 1 decode worker, default KV backend) under concurrent streams.

Clients are the official `openai` async client: chat completions, stream=True, temperature 0,
max_tokens 64 with ``ignore_eos`` (every request generates exactly max_tokens tokens). ``--streams``
requests are in flight at once (a new one starts as soon as one ends) until ``--requests`` are done,
after ``--warmup`` requests that are not counted. Prompts: short natural-language chat questions.

- TTFT: request sent -> first chunk with non-empty content.
- ITL: gaps between consecutive content chunks of one stream (a chunk may carry more than one
  token when a token ends mid-character; ``tokens_per_chunk`` says how often).

Prints one JSON line: p50/p99 (and p99.9, max) TTFT and ITL, per-request time per output token,
and the aggregate output tokens/s.

    python bench/serve_load.py [--model smollm2] [--requests 64] [--streams 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import openai
from router_common import launch_serve, quantile, summary_ms

# Chat questions that ask for long answers; streams cycle through them.
TOPICS = ["tides", "volcanoes", "bees", "glaciers", "trains", "coffee", "libraries", "rainbows",
          "bridges", "owls", "deserts", "bicycles", "clocks", "lighthouses", "markets", "comets"]  # fmt: skip
QUESTIONS = [f"Tell me about {topic} in a few paragraphs." for topic in TOPICS]


@dataclass
class Stream:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0  # content chunks
    tokens: int = 0  # completion tokens (from the usage chunk)
    total: float = 0.0  # request sent -> last content chunk


async def one_stream(client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int) -> Stream:
    s = Stream()
    start = time.perf_counter()
    last = 0.0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], stream=True, max_tokens=max_tokens,
        temperature=0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            s.tokens = chunk.usage.completion_tokens
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        now = time.perf_counter()
        if s.chunks == 0:
            s.ttft = now - start
        else:
            s.gaps.append(now - last)
        last = now
        s.chunks += 1
    s.total = last - start
    return s


async def drive(
    client: openai.AsyncOpenAI, model: str, count: int, streams: int, max_tokens: int, offset: int
) -> tuple[list[Stream], float]:
    """``count`` requests, ``streams`` at a time (closed loop); (results, wall seconds)."""
    todo = iter(range(count))
    results: list[Stream] = []

    async def client_loop() -> None:
        for k in todo:
            question = QUESTIONS[(offset + k) % len(QUESTIONS)]
            results.append(await one_stream(client, model, question, max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(streams)))
    return results, time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, object]:
    serve_args = ["--model", args.model, "--prefill", "1", "--decode", "1"]
    if args.kv_backend:
        serve_args += ["--kv-backend", args.kv_backend]
    with launch_serve(serve_args) as serve:
        client = openai.AsyncOpenAI(base_url=serve.base_url, api_key="unused", timeout=600, max_retries=0)
        try:
            await drive(client, serve.model, args.warmup, args.streams, args.max_tokens, offset=0)
            load_before = round(os.getloadavg()[0], 2)
            results, wall = await drive(
                client, serve.model, args.requests, args.streams, args.max_tokens, offset=args.warmup
            )
        finally:
            await client.close()
    tokens = sum(r.tokens for r in results)
    chunks = sum(r.chunks for r in results)
    per_token = [(r.total - r.ttft) / (r.tokens - 1) for r in results if r.tokens > 1]
    return {
        "bench": "serve_load",
        "model": serve.model,
        "workers": {"prefill": 1, "decode": 1},
        "kv_backend": args.kv_backend or "worker default (nixl)",
        "client": f"openai {openai.__version__} AsyncOpenAI, chat.completions stream=True",
        "streams": args.streams,
        "requests": len(results),
        "warmup_requests": args.warmup,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "cpu_count": os.cpu_count(),
        "worker_threads": int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // 2)),
        "ttft": summary_ms([r.ttft for r in results]),
        "itl": summary_ms([g for r in results for g in r.gaps]),
        "per_output_token": {
            "p50_ms": round(statistics.median(per_token) * 1e3, 3),
            "p99_ms": round(quantile(per_token, 0.99) * 1e3, 3),
        },
        "completion_tokens_per_request": sorted({r.tokens for r in results}),
        "tokens_per_chunk": round(tokens / chunks, 3) if chunks else None,
        "output_tok_s": round(tokens / wall, 2),
        "wall_s": round(wall, 3),
        "load_avg_1m": [load_before, round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="what `kvrelay serve --model` takes")
    parser.add_argument("--requests", type=int, default=64, help="measured requests")
    parser.add_argument("--streams", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--warmup", type=int, default=16, help="requests before measuring, not counted")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-backend", choices=["nixl", "tcp"], help="default: the worker's (nixl)")
    print(json.dumps(asyncio.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
