"""`kvrelay profile`: measure what one prefill and one decode replica sustain within the SLOs, the way a
platform team would before turning the autoscaler on, and write it as `spec.autoscaling.profile`.

Measured through the OpenAI API of a running stack (`--url`, e.g. a port-forward to a model's router
Service, or `kvrelay serve` on this machine), so the figures include the router, the KV relay and the
real scheduler:

- prefill: for each prompt length, closed-loop concurrency 1, 2, 4, ... of requests with
  `max_tokens: 1` (the prefill worker answers them alone); the prompt tokens/s of the highest
  concurrency whose TTFT quantile is within the TTFT SLO;
- decode: for each context length, batches of 1, 2, 4, ... concurrent streams of `--decode-tokens`
  tokens (EOS ignored); the generated tokens/s of the largest batch whose ITL quantile is within the
  ITL SLO (a stream's ITL: its decode time over its tokens after the first).

Each role's figure is divided by its ready replicas (from the router's /health), and the profile takes
the worst figure over the lengths asked (the longest prompts and contexts cost the most per token), so
the autoscaler's seeds hold across them. The output is a merge patch:

    kubectl patch disaggregatedmodel NAME --type merge --patch-file profile.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

FILLER = "The quick brown fox jumps over the lazy dog near the river bank. "


@dataclass(frozen=True)
class Point:
    """One measured load level."""

    role: str
    length: int  # prompt tokens (prefill) or context tokens (decode)
    concurrency: int
    tokens_per_second: float
    latency_quantile_s: float  # TTFT (prefill) or ITL (decode), at the profile's quantile
    within_slo: bool


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of a non-empty sample."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


class Client:
    """The few calls the profile makes, over one HTTP connection pool."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base = url.rstrip("/")
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout_s)

    async def model(self) -> tuple[str, int]:
        card = (await self.http.get(f"{self.base}/models")).raise_for_status().json()["data"][0]
        return card["id"], int(card.get("max_model_len") or 2048)

    async def ready_workers(self) -> dict[str, int]:
        """Ready replicas per worker role, from the router's /health (1 when it cannot tell)."""
        try:
            workers = (await self.http.get(self.base.removesuffix("/v1") + "/health")).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {"prefill": 1, "decode": 1}
        return {
            role: max(1, sum(1 for w in workers.get(role, {}).values() if w.get("healthy")))
            for role in ("prefill", "decode")
        }

    async def completion(self, model: str, prompt: str, max_tokens: int) -> tuple[float, float | None, int]:
        """(TTFT s, ITL s or None, completion tokens) of one streamed completion, EOS ignored."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        start = time.monotonic()
        first = last = None
        tokens = 0
        async with self.http.stream("POST", f"{self.base}/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{resp.status_code}: {(await resp.aread()).decode()[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                usage = json.loads(line[6:]).get("usage") or {}
                if usage.get("completion_tokens", 0) > tokens:
                    now = time.monotonic()
                    tokens = usage["completion_tokens"]
                    first = now if first is None else first
                    last = now
        if first is None or last is None:
            raise RuntimeError("no token came back")
        itl = (last - first) / (tokens - 1) if tokens > 1 else None
        return first - start, itl, tokens


def _prompt_text(tokens: int) -> str:
    """Filler text of roughly ``tokens`` tokens (about 1.3 tokens a word for English BPE)."""
    words = FILLER.split()
    return " ".join(words[i % len(words)] for i in range(int(tokens / 1.3)))


async def _sized_prompt(client: Client, model: str, tokens: int) -> str:
    """Filler text whose prompt is within 5% of ``tokens`` tokens as the served tokenizer counts."""
    text = _prompt_text(tokens)
    for _ in range(6):
        body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0}
        counted = (await client.http.post(f"{client.base}/completions", json=body)).raise_for_status().json()
        have = counted["usage"]["prompt_tokens"]
        if abs(have - tokens) <= max(2, tokens // 20):
            return text
        # Scale the word count by the miss either way (doubling overshot: a prompt near the model's
        # context came back over it, and the server's 400 ended the profile).
        words = text.split()
        text = " ".join(words[i % len(words)] for i in range(max(1, int(len(words) * tokens / have))))
    return text


def concurrency_levels(highest: int) -> list[int]:
    """1, 2, 4, ... below `highest`, then `highest` itself: the levels a role is measured at."""
    if highest < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {highest}")
    levels = [1]
    while levels[-1] * 2 < highest:
        levels.append(levels[-1] * 2)
    return levels if levels[-1] == highest else [*levels, highest]


async def _level(client: Client, model: str, prompt: str, concurrency: int, requests: int, max_tokens: int):
    queue = list(range(requests))
    results: list[tuple[float, float | None, int]] = []

    async def worker() -> None:
        while queue:
            queue.pop()
            results.append(await client.completion(model, prompt, max_tokens))

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.monotonic() - start


async def profile_prefill(
    client: Client, model: str, lengths: list[int], args: argparse.Namespace
) -> list[Point]:
    points = []
    for length in lengths:
        prompt = await _sized_prompt(client, model, length)
        await _level(client, model, prompt, 1, 2, 1)  # warm-up: first-call costs stay out of the figures
        for c in concurrency_levels(args.max_concurrency):
            results, wall = await _level(client, model, prompt, c, max(args.min_requests, 2 * c), 1)
            ttft = quantile([r[0] for r in results], args.quantile)
            point = Point("prefill", length, c, length * len(results) / wall, ttft, ttft <= args.ttft_slo)
            points.append(point)
            if not point.within_slo:
                break
    return points


async def profile_decode(
    client: Client, model: str, contexts: list[int], args: argparse.Namespace
) -> list[Point]:
    points = []
    for context in contexts:
        prompt = await _sized_prompt(client, model, context)
        await _level(client, model, prompt, 1, 1, args.decode_tokens)  # warm-up
        for b in concurrency_levels(args.max_concurrency):
            results, _ = await _level(client, model, prompt, b, b, args.decode_tokens)
            itls = [r[1] for r in results if r[1] is not None]
            itl = quantile(itls, args.quantile)
            # b streams each making a token every (mean) ITL: the batch's generated tokens/s
            rate = b / statistics.fmean(itls)
            point = Point("decode", context, b, rate, itl, itl <= args.itl_slo)
            points.append(point)
            if not point.within_slo:
                break
    return points


def per_replica(points: list[Point], replicas: int) -> float | None:
    """The worst length's best within-SLO figure, per replica; None when no level met the SLO."""
    best: dict[int, float] = {}
    for p in points:
        if p.within_slo:
            best[p.length] = max(best.get(p.length, 0.0), p.tokens_per_second)
    if len({p.length for p in points}) != len(best):
        return None  # some length met the SLO at no load level: no seed holds for it
    return min(best.values()) / replicas


def patch(prefill: float, decode: float) -> dict[str, Any]:
    profile = {"prefillTokensPerSecond": round(prefill, 1), "decodeTokensPerSecond": round(decode, 1)}
    return {"spec": {"autoscaling": {"profile": profile}}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    client = Client(args.url, args.api_key, args.timeout)
    try:
        model, max_len = await client.model()
        lengths = [n for n in args.prompt_tokens if n + 1 < max_len]
        contexts = [n for n in args.contexts if n + args.decode_tokens < max_len]
        if not lengths or not contexts:
            raise SystemExit(f"every length asked exceeds the model's context ({max_len} tokens)")
        replicas = await client.ready_workers()
        prefill = await profile_prefill(client, model, lengths, args)
        decode = await profile_decode(client, model, contexts, args)
    finally:
        await client.http.aclose()
    prefill_rate = per_replica(prefill, replicas["prefill"])
    decode_rate = per_replica(decode, replicas["decode"])
    return {
        "model": model,
        "replicas": replicas,
        # every level tried met the SLO: the figure is what the highest concurrency gave, a lower bound
        "lower_bound": {
            role: all(p.within_slo for p in points)
            for role, points in (("prefill", prefill), ("decode", decode))
        },
        "slo": {"ttft_seconds": args.ttft_slo, "itl_seconds": args.itl_slo, "quantile": args.quantile},
        "points": [asdict(p) for p in prefill + decode],
        "patch": None if prefill_rate is None or decode_rate is None else patch(prefill_rate, decode_rate),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", required=True, help="the OpenAI base URL of a running stack (http://host:port/v1)"
    )
    p.add_argument("--api-key", help="the router's API key, if it has one")
    p.add_argument("--ttft-slo", type=float, required=True, help="TTFT SLO in seconds (spec.autoscaling.slo)")
    p.add_argument("--itl-slo", type=float, required=True, help="ITL SLO in seconds (spec.autoscaling.slo)")
    p.add_argument(
        "--quantile", type=float, default=0.9, help="latency quantile held to the SLO (default 0.9)"
    )
    p.add_argument(
        "--prompt-tokens", type=_lengths, default=[256, 1024], help="prompt lengths, comma-separated"
    )
    p.add_argument("--contexts", type=_lengths, default=[256, 1024], help="decode contexts, comma-separated")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode stream (default 32)")
    p.add_argument("--min-requests", type=int, default=6, help="requests per prefill level at least")
    p.add_argument(
        "--max-concurrency",
        type=_positive,
        default=64,
        help="highest concurrency tried (1, 2, 4, ... up to it)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request at most")
    p.add_argument("--out", help="write the merge patch (YAML) here; the measurements go to stdout as JSON")


def _lengths(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("lengths are comma-separated integers >= 2")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(args: argparse.Namespace) -> int:
    """Run the profile; print the measurements (one JSON object) and write the patch."""
    try:
        result = asyncio.run(run(args))
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"kvrelay profile: {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if result["patch"] is None:
        print(
            "kvrelay profile: some length met the SLO at no load level: loosen the SLO or shorten the lengths"
        )
        return 1
    if args.out:
        import yaml

        header = (
            f"# kvrelay profile of {result['model']} at TTFT <= {args.ttft_slo}s, ITL <= {args.itl_slo}s "
            f"(p{round(args.quantile * 100)}), per replica\n"
        )
        with open(args.out, "w") as f:
            f.write(header + yaml.safe_dump(result["patch"], sort_keys=False))
    return 0
