"""Structured output overhead: inter-token latency with a JSON-schema grammar vs without, same prompts,
same `kvrelay serve` run, through the disaggregated stack (KV over NIXL) with the official openai client.

Rounds alternate free and constrained requests (so drift on a shared machine hits both alike); each round
runs `--concurrency` streams at once. A stream's ITL is (last token time - first token time) / (tokens - 1),
its tokens counted by the server (continuous usage stats); the figures are medians over streams. The free
run ignores EOS and asks for as many tokens as the constrained one produced, so both decode the same
number of tokens per stream.

    python bench/structured_output.py [--model smollm2] [--rounds 6] [--concurrency 4]

Prints one JSON line: ITL medians (ms) and the constrained / free ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import openai
from router_common import launch_serve

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "summary": {"type": "string", "minLength": 200, "maxLength": 400},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 5},
        "rating": {"enum": [1, 2, 3, 4, 5]},
    },
    "required": ["title", "summary", "tags", "rating"],
    "additionalProperties": False,
}
# vLLM's extension (the SDK's type does not know it): the server's token count on every chunk
USAGE_EVERY_CHUNK: Any = {"include_usage": True, "continuous_usage_stats": True}
TOPICS = [
    "a train journey",
    "a rainy city",
    "a mountain village",
    "a night market",
    "an old library",
    "a harbour",
]


async def one(
    client: openai.AsyncOpenAI, model: str, topic: str, max_tokens: int, constrained: bool
) -> tuple[float, int]:
    """(mean ITL in s, tokens) of one streamed chat answer."""
    extra: dict[str, Any] = {"extra_body": {"ignore_eos": True}}
    if constrained:
        extra = {
            "response_format": {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}
        }
    messages = [{"role": "user", "content": f"Review {topic} as JSON."}]
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options=USAGE_EVERY_CHUNK, **extra,
    )  # fmt: skip
    first = last = None
    tokens = 0
    text = []
    async for chunk in stream:
        now = time.monotonic()
        if chunk.usage is not None and chunk.usage.completion_tokens > tokens:
            tokens = chunk.usage.completion_tokens
            first = first if first is not None else now
            last = now
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
    if constrained:
        json.loads("".join(text))  # a constrained answer always parses (the check the tests make)
    assert first is not None and last is not None and tokens > 1
    return (last - first) / (tokens - 1), tokens


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with launch_serve(
        ["--model", args.model, "--prefill", "1", "--decode", "1", "--kv-backend", "nixl"]
    ) as serve:
        client = openai.AsyncOpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=600)
        await one(client, serve.model, "a warm-up", 8, False)  # first-call costs (tokenizer, matcher) out
        await one(client, serve.model, "a warm-up", 400, True)
        itl: dict[str, list[float]] = {"free": [], "json_schema": []}
        lengths: list[int] = []
        for r in range(args.rounds):
            topics = [TOPICS[(r * args.concurrency + i) % len(TOPICS)] for i in range(args.concurrency)]
            constrained = await asyncio.gather(*(one(client, serve.model, t, 400, True) for t in topics))
            free = await asyncio.gather(
                *(
                    one(client, serve.model, t, n, False)
                    for t, (_, n) in zip(topics, constrained, strict=True)
                )
            )
            itl["json_schema"] += [x for x, _ in constrained]
            itl["free"] += [x for x, _ in free]
            lengths += [n for _, n in constrained]
    free_ms = statistics.median(itl["free"]) * 1e3
    constrained_ms = statistics.median(itl["json_schema"]) * 1e3
    return {
        "bench": "structured_output_itl",
        "model": args.model,
        "concurrency": args.concurrency,
        "streams": len(lengths),
        "tokens_per_stream_median": statistics.median(lengths),
        "itl_ms_median_free": round(free_ms, 2),
        "itl_ms_median_json_schema": round(constrained_ms, 2),
        "ratio_json_schema_vs_free": round(constrained_ms / free_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
