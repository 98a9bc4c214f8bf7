"""Prefix caching and prefix-aware routing on a public trace with real prefix structure.

Workload: a window of consecutive requests of the Mooncake FAST'25 trace (`synthetic_trace.jsonl`,
Apache-2.0, Qin et al., FAST 2025). Its `hash_ids` name 512-token blocks with prefix semantics (one
id = one block after one particular prefix). Scaled to this CPU: every id becomes a fixed block of
``--block-tokens`` (16) token ids drawn from a generator seeded by the id, so equal ids are equal
tokens; prompts are capped at ``--max-blocks`` blocks (a prefix of the ids, so the structure holds);
outputs are the trace's length / 32, 1..16 tokens, with ignore_eos. Requests are sent open-loop at the
trace's timestamps divided by ``--speedup`` to `kvrelay serve --model tiny` with 2 prefill workers and
1 decode worker, as completions with token-id prompts, streamed (TTFT = first chunk).

Settings, each on a fresh stack (one JSON line each, ratios against (a) from the same run):
  (a) no cache     -- workers --no-enable-prefix-caching, router --prefix-weight 0 --decode-prefix-weight 0
  (b) cache + least-loaded routing -- router --prefix-weight 0 --decode-prefix-weight 0
  (c) cache + prefix-aware routing -- the defaults
and a multi-turn chat load on (c)'s defaults (on (c)'s stack when it follows (c)): N conversations x M
turns over one shared system prompt, each turn resending the whole history (earlier prompts, the
answers as text re-encoded, a new question); multi-lb is the same load on (b)'s flags (caches on,
both routers least-loaded), to see what routing adds with `--decode 2`.

Hit rate = prefix-cache hit tokens / looked-up tokens on the prefill workers (their own /metrics);
prefill tokens computed = their kvrelay_prompt_tokens_computed_total. The upper bound is the window's
own: an infinite cache, empty at the start, one worker; given twice, for a cache that may reuse every
block and for one that always computes the block holding the prompt's last token, as kvrelay's (and
vLLM's) engine does (the step samples from that token's logits).

The decode side is reported too: its hit rate (prompt tokens the decode worker already held, so the
relay did not move them) and the KV bytes relayed (kvrelay_kv_transfer_bytes_total, reader side).

    python bench/prefix_cache.py [--window 2000] [--start 0] [--speedup 8] [--settings a,b,c,multi]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from router_common import launch_serve, quantile

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from sim.traces import traces_dir  # noqa: E402

TINY_VOCAB = 512  # the tiny model's; token ids 5.. avoid its special tokens
METRICS_RE = re.compile(r"worker (\S+) pid=\d+ grpc=\S+ metrics=:(\d+)")
# Multi-turn loads and the trace setting whose flags they run with.
MULTI = {"multi": "c", "multi-lb": "b"}
SETTINGS = {
    "a": (
        "no cache",
        [
            "--worker-arg=--no-enable-prefix-caching",
            "--router-arg=--prefix-weight=0",
            "--router-arg=--decode-prefix-weight=0",
        ],
    ),
    "b": (
        "cache + least-loaded routing",
        ["--router-arg=--prefix-weight=0", "--router-arg=--decode-prefix-weight=0"],
    ),
    "c": ("cache + prefix-aware routing", []),
}


@dataclass(frozen=True)
class TraceRequest:
    at_s: float  # arrival, trace time
    hash_ids: tuple[int, ...]
    max_tokens: int


def load_window(path: Path, start: int, count: int, max_blocks: int) -> tuple[list[TraceRequest], int]:
    """``count`` consecutive rows from ``start``; (requests, how many prompts were capped)."""
    rows = []
    with path.open() as f:
        for i, line in enumerate(f):
            if i >= start + count:
                break
            if i >= start:
                rows.append(json.loads(line))
    t0 = rows[0]["timestamp"]
    capped = sum(len(r["hash_ids"]) > max_blocks for r in rows)
    requests = [
        TraceRequest(
            (r["timestamp"] - t0) / 1000.0,
            tuple(r["hash_ids"][:max_blocks]),
            max(1, min(16, round(r["output_length"] / 32))),
        )
        for r in rows
    ]
    return requests, capped


def block_tokens(hash_id: int, n: int) -> list[int]:
    rng = random.Random(hash_id)
    return [rng.randrange(5, TINY_VOCAB) for _ in range(n)]


def ideal_hit_rate(
    prompts: Sequence[tuple[Sequence[Hashable], int]], block: int, last_block_computed: bool = True
) -> float:
    """Hit tokens / prompt tokens with an infinite cache, empty at the start, on one worker.

    ``prompts``: in arrival order, each its full blocks' prefix keys (the trace's hash ids, or block
    hashes) and its length in tokens. ``last_block_computed``: the block holding a prompt's last token is
    never taken from the cache (kvrelay's and vLLM's engines compute it: the step samples its logits)."""
    seen: set[Hashable] = set()
    hit = total = 0
    for keys, num_tokens in prompts:
        usable = keys[: (num_tokens - 1) // block] if last_block_computed else keys
        n = 0
        for key in usable:
            if key not in seen:
                break
            n += 1
        hit += n * block
        total += num_tokens
        seen.update(keys)
    return hit / total


def trace_prompts(requests: list[TraceRequest], block: int) -> list[tuple[Sequence[Hashable], int]]:
    return [(r.hash_ids, len(r.hash_ids) * block) for r in requests]


def worker_counters(ports: dict[str, int], role: str) -> dict[str, float]:
    """Prefix-cache and prompt counters summed over the `role` workers' /metrics."""
    names = ("kvrelay_prefix_cache_queries_total", "kvrelay_prefix_cache_hits_total",
             "kvrelay_prompt_tokens_computed_total", "kvrelay_kv_transfer_bytes_total")  # fmt: skip
    out = dict.fromkeys(names, 0.0)
    per_worker_hits = {}
    for name, port in ports.items():
        if not name.startswith(role):
            continue
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        for row in text.splitlines():
            for metric in names:
                if row.startswith(metric + "{"):
                    out[metric] += float(row.rsplit(" ", 1)[1])
                    if metric == "kvrelay_prefix_cache_hits_total":
                        per_worker_hits[name] = float(row.rsplit(" ", 1)[1])
    out["per_worker_hits"] = per_worker_hits  # type: ignore[assignment]
    return out


async def timed_completion(
    client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int
) -> tuple[float, str]:
    """(TTFT seconds, text) of one streamed completion."""
    start = time.perf_counter()
    ttft = None
    text = []
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if ttft is None and chunk.choices:
            ttft = time.perf_counter() - start
        if chunk.choices:
            text.append(chunk.choices[0].text)
    return (ttft if ttft is not None else time.perf_counter() - start), "".join(text)


async def replay(client: openai.AsyncOpenAI, model: str, requests: list[TraceRequest], block: int,
                 speedup: float) -> tuple[list[float], float, int]:  # fmt: skip
    """Open loop at trace time / speedup; (TTFTs, wall seconds, failures)."""
    ttfts: list[float] = []
    failures = 0

    async def one(r: TraceRequest, t0: float) -> None:
        nonlocal failures
        await asyncio.sleep(max(0.0, t0 + r.at_s / speedup - time.perf_counter()))
        prompt = [t for h in r.hash_ids for t in block_tokens(h, block)]
        try:
            ttft, _ = await timed_completion(client, model, prompt, r.max_tokens)
            ttfts.append(ttft)
        except openai.APIError as exc:
            failures += 1
            print(f"request failed: {exc}", file=sys.stderr)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r, t0) for r in requests))
    return ttfts, time.perf_counter() - t0, failures


async def multi_turn(
    client: openai.AsyncOpenAI, model: str, args: argparse.Namespace
) -> tuple[list[float], list[list[int]]]:
    """N conversations over one shared system prompt, M turns each; users arrive ``--stagger-s`` apart
    and think ``--think-s`` between an answer and their next message. (TTFTs, prompts in sending order.)"""
    rng = random.Random(7)
    system = [rng.randrange(5, TINY_VOCAB) for _ in range(128)]
    ttfts: list[float] = []
    sent: list[list[int]] = []
    from kvrelay_worker.model_store import ensure_tiny_model
    from kvrelay_worker.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(ensure_tiny_model())

    async def conversation(c: int) -> None:
        crng = random.Random(1000 + c)
        history = list(system)
        await asyncio.sleep(c * args.stagger_s)
        for turn in range(args.turns):
            if turn:
                await asyncio.sleep(args.think_s)
            history += [crng.randrange(5, TINY_VOCAB) for _ in range(24)]  # the user's next message
            sent.append(list(history))
            ttft, answer = await timed_completion(client, model, history, 16)
            ttfts.append(ttft)
            history += tokenizer.encode(answer)  # the client sends the answer back as text

    await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    return ttfts, sent


def chat_prompts(prompts: list[list[int]], block: int) -> list[tuple[Sequence[Hashable], int]]:
    """Token prompts as ``ideal_hit_rate`` takes them. Only prompts are cached: an answer's KV is computed
    on a decode worker, so the next turn's prefill computes it again."""
    from kvrelay_worker.prefix_hash import chain_hashes, root_hash

    return [(chain_hashes(p, block, root_hash("")), len(p)) for p in prompts]


def _summary(ttfts: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ttfts) * 1e3, 2),
        "p99_ms": round(quantile(ttfts, 0.99) * 1e3, 2),
    }


def serve_args(key: str, args: argparse.Namespace) -> list[str]:
    extra = SETTINGS[MULTI.get(key, key)][1]  # multi-turn runs on (c)'s settings, or (b)'s
    return ["--model", "tiny", "--prefill", "2", "--decode", str(args.decode),
            f"--worker-arg=--num-blocks={args.num_blocks}",
            f"--router-arg=--prefix-index-blocks={args.num_blocks}", *extra]  # fmt: skip


async def run_stack(
    keys: list[str], args: argparse.Namespace, requests: list[TraceRequest]
) -> list[dict[str, object]]:
    """One fresh `kvrelay serve` for settings that share its flags (c, then multi), run in turn."""
    lines: list[str] = []
    results = []
    with launch_serve(serve_args(keys[0], args), log_lines=lines) as serve:
        ports = {m.group(1): int(m.group(2)) for line in lines if (m := METRICS_RE.search(line))}
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=4096, max_keepalive_connections=256),
                                 timeout=httpx.Timeout(900.0))  # fmt: skip
        client = openai.AsyncOpenAI(
            base_url=serve.base_url, api_key="unused", max_retries=0, http_client=http
        )
        try:
            for key in keys:
                before = worker_counters(ports, "prefill")
                decode_before = worker_counters(ports, "decode")
                if key in MULTI:
                    t0 = time.perf_counter()
                    ttfts, prompts = await multi_turn(client, serve.model, args)
                    wall, failures, n = time.perf_counter() - t0, 0, len(ttfts)
                else:
                    ttfts, wall, failures = await replay(
                        client, serve.model, requests, args.block_tokens, args.speedup
                    )
                    n = len(requests)
                results.append(
                    _line(key, before, worker_counters(ports, "prefill"), ttfts, wall, failures, n)
                )
                results[-1].update(_decode_side(decode_before, worker_counters(ports, "decode")))
                if key in MULTI:
                    bound = ideal_hit_rate(chat_prompts(prompts, args.block_tokens), args.block_tokens)
                    results[-1]["ideal_hit_rate_last_block_computed"] = round(bound, 4)
        finally:
            await client.close()
    return results


def _line(
    key: str, before: dict, after: dict, ttfts: list[float], wall: float, failures: int, n: int
) -> dict[str, object]:
    delta = {k: after[k] - before[k] for k in after if k != "per_worker_hits"}
    queries = delta["kvrelay_prefix_cache_queries_total"]
    per_worker = {
        k: int(v - before["per_worker_hits"].get(k, 0.0)) for k, v in after["per_worker_hits"].items()
    }
    name = f"multi-turn chat, {SETTINGS[MULTI[key]][0]}" if key in MULTI else SETTINGS[key][0]
    return {
        "bench": "prefix_cache",
        "setting": key,
        "name": name,
        "requests": n,
        "failed": failures,
        "prefill_tokens_computed": int(delta["kvrelay_prompt_tokens_computed_total"]),
        "hit_rate": round(delta["kvrelay_prefix_cache_hits_total"] / queries, 4) if queries else 0.0,
        "hits_per_prefill_worker": per_worker,
        "ttft": _summary(ttfts) if ttfts else {},
        "throughput_req_s": round(n / wall, 2),
        "wall_s": round(wall, 1),
    }


def _decode_side(before: dict, after: dict) -> dict[str, object]:
    """What the decode workers' own prefix caches saved the relay."""
    queries = after["kvrelay_prefix_cache_queries_total"] - before["kvrelay_prefix_cache_queries_total"]
    hits = after["kvrelay_prefix_cache_hits_total"] - before["kvrelay_prefix_cache_hits_total"]
    relayed = after["kvrelay_kv_transfer_bytes_total"] - before["kvrelay_kv_transfer_bytes_total"]
    return {"decode_hit_rate": round(hits / queries, 4) if queries else 0.0, "kv_bytes_relayed": int(relayed)}


async def main_async(args: argparse.Namespace) -> None:
    path = traces_dir(BENCH_DIR.parent) / "synthetic_trace.jsonl"
    requests, capped = load_window(path, args.start, args.window, args.max_blocks)
    block = args.block_tokens
    window = {
        "trace": "Mooncake FAST25 synthetic_trace.jsonl",
        "rows": f"{args.start}-{args.start + len(requests) - 1}",
        "span_s": round(requests[-1].at_s, 1),
        "speedup": args.speedup,
        "block_tokens": args.block_tokens,
        "prompt_tokens_mean": round(
            statistics.mean(len(r.hash_ids) for r in requests) * args.block_tokens, 1
        ),
        "capped_prompts": capped,
        "ideal_hit_rate": round(ideal_hit_rate(trace_prompts(requests, block), block, False), 4),
        "ideal_hit_rate_last_block_computed": round(ideal_hit_rate(trace_prompts(requests, block), block), 4),
        "num_blocks_per_worker": args.num_blocks,
        "cpu_count": os.cpu_count(),
    }
    baseline: dict[str, object] | None = None
    keys = args.settings.split(",")
    stacks: list[list[str]] = []  # consecutive settings with the same flags share one stack
    for key in keys:
        if stacks and serve_args(stacks[-1][-1], args) == serve_args(key, args):
            stacks[-1].append(key)
        else:
            stacks.append([key])
    for group in stacks:
        for line in await run_stack(group, args, requests):
            key = str(line["setting"])
            _finish(line, key, window, baseline, args)
            if key == "a" and baseline is None:
                baseline = line
            print(json.dumps(line), flush=True)


def _finish(line: dict, key: str, window: dict, baseline: dict | None, args: argparse.Namespace) -> None:
    """A trace setting's line gets the window, its bound and the ratios against (a) from this run; the
    multi-turn line its shape."""
    if key in MULTI:
        line.update(conversations=args.conversations, turns=args.turns, stagger_s=args.stagger_s,
                    think_s=args.think_s)  # fmt: skip
        return
    line["window"] = window
    line["gap_to_bound"] = round(window["ideal_hit_rate_last_block_computed"] - line["hit_rate"], 4)
    base = line if key == "a" and baseline is None else baseline
    if base is not None:
        line["ratio_vs_no_cache"] = {
            "prefill_tokens_computed": round(
                line["prefill_tokens_computed"] / max(1, base["prefill_tokens_computed"]), 4
            ),
            "ttft_p50": round(line["ttft"]["p50_ms"] / base["ttft"]["p50_ms"], 4),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=2000, help="consecutive trace rows")
    p.add_argument("--start", type=int, default=0, help="first row of the window")
    p.add_argument("--speedup", type=float, default=8.0, help="trace time / this = replay time")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per trace block (512 in the trace)")
    p.add_argument("--max-blocks", type=int, default=120, help="prompt cap in blocks (tiny's 2,048 context)")
    p.add_argument("--num-blocks", type=int, default=32768, help="KV blocks per worker (8 KiB each for tiny)")
    p.add_argument(
        "--settings", default="a,b,c,multi", help="a, b, c, multi and multi-lb (see above), in order"
    )
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--stagger-s", type=float, default=0.25, help="multi-turn: seconds between users' starts")
    p.add_argument("--think-s", type=float, default=0.5, help="multi-turn: a user's pause between turns")
    p.add_argument("--turns", type=int, default=8)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
