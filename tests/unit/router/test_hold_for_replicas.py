"""Scale to zero at the router: a request whose role has no ready worker is held (bounded in number and
time) until one turns ready, then served; a full queue or a wait that runs out is a 503 with Retry-After.

Real HTTP (uvicorn, the official openai client) against in-process KServe v2 stand-ins; workers come and
go through the pool as discovery would add a pod's address once it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from kvrelay_worker.router.app import create_app
from kvrelay_worker.router.config import RouterConfig
from kvrelay_worker.router.pool import Role, WorkerPool
from kvrelay_worker.tokenizer import Tokenizer

from .conftest import FakeWorker, run_fake_worker, toy_generate

MODEL = "toy"


class ManualDiscovery:
    """Discovery driven by the test: a role's workers appear when the test says their pods are ready."""

    def __init__(self) -> None:
        self.pool: WorkerPool | None = None

    async def start(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def stop(self) -> None:
        return None


@dataclass
class HoldStack:
    http: httpx.AsyncClient
    client: openai.AsyncOpenAI
    discovery: ManualDiscovery
    tokenizer: Tokenizer
    exits: contextlib.AsyncExitStack

    async def add_worker(self, role: Role) -> FakeWorker:
        """Start a stand-in worker and publish it, as an EndpointSlice update for a ready pod would."""
        address, worker, _ = await self.exits.enter_async_context(run_fake_worker(self.tokenizer.vocab_size))
        assert self.discovery.pool is not None
        await self.discovery.pool.set_addresses(role, [address])
        return worker

    async def gauge(self, role: str) -> float:
        text = (await self.http.get("/metrics")).text
        pattern = rf'kvrelay_router_requests_waiting_for_replicas{{model="{MODEL}",role="{role}"}} (\S+)'
        match = re.search(pattern, text)
        assert match is not None, text
        return float(match.group(1))

    async def metric(self, line_start: str) -> float:
        text = (await self.http.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def wait_gauge(self, role: str, value: float, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.gauge(role) != value:
            assert time.monotonic() < deadline, f"waiting gauge of {role} never reached {value}"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def run_hold_stack(
    tokenizer_dir: Path, tokenizer: Tokenizer, max_waiting: int = 256, max_wait_s: float = 30.0
) -> AsyncIterator[HoldStack]:
    """A router with no worker at all: each test adds the ones it wants."""
    config = RouterConfig(
        model_dir=tokenizer_dir, served_model_name=MODEL, max_model_len=128, health_interval_s=0.2,
        max_waiting_requests=max_waiting, max_wait_s=max_wait_s,
    )  # fmt: skip
    discovery = ManualDiscovery()
    app = create_app(config, discovery, tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and not task.done(), "router did not start"
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    async with contextlib.AsyncExitStack() as exits:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        stack = HoldStack(httpx.AsyncClient(base_url=url, timeout=30), client, discovery, tokenizer, exits)
        try:
            yield stack
        finally:
            await client.close()
            await stack.http.aclose()
            server.should_exit = True
            await asyncio.wait_for(task, 10)


async def test_a_request_waits_for_decode_and_is_served_once_a_worker_is_ready(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_hold_stack(tokenizer_dir, tokenizer) as stack:
        prefill = await stack.add_worker("prefill")
        assert (await stack.http.get("/ready")).status_code == 200  # held requests are taken
        assert (await stack.http.get("/health")).status_code == 503  # ... but a pool is empty
        prompt = "the quick brown fox"
        pending = asyncio.create_task(
            stack.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        )
        await stack.wait_gauge("decode", 1)
        assert await stack.gauge("prefill") == 0  # prefill has a ready worker: not waited for
        await asyncio.sleep(0.3)
        assert not pending.done()
        assert prefill.prefill_calls == 0  # no KV sits on a prefill worker while the request waits
        decode = await stack.add_worker("decode")
        reply = await asyncio.wait_for(pending, 10)
        ids = tokenizer.encode(prompt)
        assert reply.choices[0].text == tokenizer.decode(toy_generate(ids, 6, tokenizer.vocab_size))
        assert (prefill.prefill_calls, decode.decode_calls) == (1, 1)
        assert await stack.gauge("decode") == 0
        assert await stack.metric(f'kvrelay_router_replica_wait_seconds_count{{model="{MODEL}"}}') == 1
        assert await stack.metric(f'kvrelay_requests_total{{model="{MODEL}",status="success"}}') == 1


async def test_a_stream_waits_for_both_roles_then_streams(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    async with run_hold_stack(tokenizer_dir, tokenizer) as stack:

        async def stream_text() -> str:
            events = await stack.client.completions.create(
                model=MODEL, prompt="hello", max_tokens=5, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in events if c.choices])

        pending = asyncio.create_task(stream_text())
        await stack.wait_gauge("prefill", 1)
        await stack.wait_gauge("decode", 1)  # one request, counted for each role it waits for
        await stack.add_worker("decode")
        await stack.wait_gauge("decode", 0)  # decode is ready: it waits for prefill only
        assert await stack.gauge("prefill") == 1 and not pending.done()
        await stack.add_worker("prefill")
        text = await asyncio.wait_for(pending, 10)
        ids = tokenizer.encode("hello")
        assert text == tokenizer.decode(toy_generate(ids, 5, tokenizer.vocab_size))
        assert (await stack.gauge("prefill"), await stack.gauge("decode")) == (0, 0)


async def test_the_wait_runs_out_with_a_503_and_retry_after(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_hold_stack(tokenizer_dir, tokenizer, max_wait_s=0.5) as stack:
        await stack.add_worker("prefill")
        started = time.monotonic()
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
        resp = await stack.http.post("/v1/completions", json=body)
        waited = time.monotonic() - started
        assert resp.status_code == 503 and 0.5 <= waited < 5, (resp.status_code, waited)
        assert resp.headers["retry-after"] == "1"
        error = resp.json()["error"]
        assert error["code"] == "no_ready_replicas" and error["type"] == "service_unavailable"
        assert "no ready replica of the decode role after waiting 0.5 s" in error["message"]
        # The official client sees the same as an APIStatusError with the header.
        with pytest.raises(openai.APIStatusError) as info:
            await stack.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
        refused = f'kvrelay_router_replica_wait_refusals_total{{model="{MODEL}",reason="timeout"}}'
        assert await stack.metric(refused) == 2
        assert await stack.gauge("decode") == 0


async def test_a_full_queue_refuses_at_once_and_a_client_that_leaves_is_forgotten(
    tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    async with run_hold_stack(tokenizer_dir, tokenizer, max_waiting=1, max_wait_s=30) as stack:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
        first = asyncio.create_task(stack.http.post("/v1/completions", json=body))
        await stack.wait_gauge("decode", 1)
        started = time.monotonic()
        resp = await stack.http.post("/v1/completions", json=body)
        assert resp.status_code == 503 and time.monotonic() - started < 2
        assert resp.headers["retry-after"] == "30"
        message = resp.json()["error"]["message"]
        assert "no ready replica of the prefill and decode roles, and 1 requests already wait" in message
        refused = f'kvrelay_router_replica_wait_refusals_total{{model="{MODEL}",reason="queue_full"}}'
        assert await stack.metric(refused) == 1
        first.cancel()  # the client hangs up while held
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await stack.wait_gauge("decode", 0)
        await stack.wait_gauge("prefill", 0)
        cancelled = f'kvrelay_requests_total{{model="{MODEL}",status="cancelled"}}'
        deadline = time.monotonic() + 10
        while await stack.metric(cancelled) != 1:
            assert time.monotonic() < deadline, "the held request was not ended as cancelled"
            await asyncio.sleep(0.05)
        # Its place is free again: the next request is held (not refused) and served.
        pending = asyncio.create_task(stack.http.post("/v1/completions", json=body))
        await stack.wait_gauge("decode", 1)
        await stack.add_worker("prefill")
        await stack.add_worker("decode")
        assert (await asyncio.wait_for(pending, 10)).status_code == 200


async def test_holding_off_answers_at_once_as_before(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    async with run_hold_stack(tokenizer_dir, tokenizer, max_wait_s=0) as stack:
        assert (await stack.http.get("/ready")).status_code == 503
        await stack.add_worker("prefill")
        resp = await stack.http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}
        )
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_decode_worker"
        assert "retry-after" not in resp.headers
        await stack.add_worker("decode")
        deadline = time.monotonic() + 10
        while (await stack.http.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
