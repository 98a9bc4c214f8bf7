"""Workers killed under a live router: a decode worker mid-stream (the router migrates the stream to the
survivor and the client sees no error; token-exactness is tests/e2e/test_migration.py's), then a prefill
worker (requests are retried on the other one)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import run_serve

pytestmark = pytest.mark.e2e


def test_workers_killed_under_load(tmp_path: Path) -> None:
    with run_serve(["--model", "tiny", "--prefill", "2", "--decode", "2"], tmp_path) as serve:
        client = openai.OpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=60)
        health_url = serve.base_url.removesuffix("/v1") + "/health"
        stream = client.completions.create(
            model=serve.model, prompt="Rivers run to the sea", max_tokens=2000, temperature=0, stream=True
        )
        chunks = iter(stream)
        received = [next(chunks) for _ in range(5)]
        decode = httpx.get(health_url, timeout=10).json()["workers"]["decode"]
        busy = [address for address, w in decode.items() if w["running"] == 1]
        assert len(busy) == 1, decode
        victim = serve.pid_of_address(busy[0])
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for chunk in chunks:  # no error: the rest of the stream comes from the other decode worker
            received.append(chunk)
        assert time.monotonic() - killed_at < 120.0, "the migrated stream took too long"
        assert received[-1].choices[0].finish_reason == "length"
        metrics = httpx.get(serve.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
        migrations = [
            line for line in metrics.splitlines() if line.startswith("kvrelay_router_migrations_total")
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in migrations) >= 1, migrations

        # New requests go to the surviving decode worker and succeed.
        for i in range(4):
            reply = client.completions.create(
                model=serve.model, prompt=f"again {i}", max_tokens=8, temperature=0
            )
            assert reply.choices[0].finish_reason == "length" and reply.choices[0].text
        decode = httpx.get(health_url, timeout=10).json()["workers"]["decode"]
        assert decode[busy[0]]["healthy"] is False
        assert [w["healthy"] for a, w in decode.items() if a != busy[0]] == [True]

        # A prefill worker dies: the router has not noticed yet, so a request may hit it first and must
        # be retried on the other prefill worker; none may fail.
        dead_prefill = serve.workers["prefill-0"]
        os.kill(dead_prefill[0], signal.SIGKILL)
        for i in range(4):
            reply = client.completions.create(model=serve.model, prompt=f"once more {i}", max_tokens=4)
            assert reply.choices[0].finish_reason == "length"
        prefill = httpx.get(health_url, timeout=10).json()["workers"]["prefill"]
        assert prefill[dead_prefill[1]]["healthy"] is False

        # Stopping serve while a client still streams must not wait for that generation to end.
        open_stream = iter(
            client.completions.create(model=serve.model, prompt="long", max_tokens=1900, stream=True)
        )
        next(open_stream)
        stopping_at = time.monotonic()
    assert time.monotonic() - stopping_at < 25, "serve waited for an open stream before stopping"
    assert serve.proc.returncode in (0, 130, -signal.SIGTERM)
    assert serve.leftovers == []
