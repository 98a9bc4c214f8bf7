"""A worker that leaves discovery (a pod marked for deletion leaves its EndpointSlice) keeps its channel
until the router's calls on it end: a draining worker finishes those streams, and closing the channel
at once would cut them."""

from __future__ import annotations

import asyncio

from kvrelay_worker.ports import free_port
from kvrelay_worker.router.pool import WorkerPool


async def test_removed_worker_is_not_chosen_but_keeps_its_calls_until_they_end() -> None:
    pool = WorkerPool(retire_timeout_s=30)
    address = f"127.0.0.1:{free_port()}"  # nothing listens: only the bookkeeping is under test
    await pool.set_addresses("decode", [address])
    worker = pool.roles["decode"].workers[address]
    worker.healthy, worker.running_sequences = True, 1  # one stream in flight on it
    await pool.set_addresses("decode", [])
    assert pool.roles["decode"].choose_for_stream([1, 2, 3]) is None  # no new calls go to it
    await asyncio.sleep(0.5)
    assert pool.retiring == [address]  # ... but the stream still has its channel
    worker.running_sequences = 0
    for _ in range(50):
        if not pool.retiring:
            break
        await asyncio.sleep(0.1)
    assert pool.retiring == []
    await pool.close()


async def test_retiring_is_bounded_and_pool_close_ends_it() -> None:
    pool = WorkerPool(retire_timeout_s=0.3)
    stuck = f"127.0.0.1:{free_port()}"
    await pool.set_addresses("prefill", [stuck])
    pool.roles["prefill"].workers[stuck].queued_prefill_tokens = 5  # a call that never ends
    await pool.set_addresses("prefill", [])
    await asyncio.sleep(1.0)
    assert pool.retiring == []  # closed at the bound anyway
    await pool.set_addresses("prefill", [stuck])
    pool.roles["prefill"].workers[stuck].queued_prefill_tokens = 5
    await pool.set_addresses("prefill", [])
    assert pool.retiring == [stuck]
    await pool.close()  # does not wait for the bound
    assert pool.retiring == []
