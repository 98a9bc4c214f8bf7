"""The router's gRPC client against a real decode worker: a channel closed under a live stream ends it
with `WorkerFailed` (the request migrates), not with a bare CancelledError that would drop the client's
HTTP connection."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from kvrelay_worker.model_store import ensure_tiny_model
from kvrelay_worker.router.errors import WorkerFailed
from kvrelay_worker.router.kserve import WorkerClient
from worker_fixtures import WorkerProcess, spawn_worker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def decode_worker() -> Iterator[WorkerProcess]:
    worker, ready = spawn_worker("decode", ensure_tiny_model())
    assert ready.wait(180), worker.log()
    yield worker
    worker.stop()


async def test_channel_closed_under_a_stream_is_a_worker_failure(decode_worker: WorkerProcess) -> None:
    client = WorkerClient(decode_worker.grpc_address)
    greedy = {"max_tokens": 2000, "temperature": 0.0, "ignore_eos": True}
    stream = client.decode("r1", [5] * 16, 7, b"", greedy)
    received = 0
    with pytest.raises(WorkerFailed) as failed:
        async for _ in stream:
            received += 1
            if received == 3:
                asyncio.get_running_loop().create_task(client.close())
    assert failed.value.worker_down and failed.value.reason == "worker_lost"
    assert 3 <= received < 2000
    # The worker itself is fine: a new client streams from it.
    other = WorkerClient(decode_worker.grpc_address)
    tokens = [t async for t in other.decode("r2", [5] * 16, 7, b"", {**greedy, "max_tokens": 4})]
    await other.close()
    assert len(tokens) == 3 and tokens[-1].finish_reason == "length"
