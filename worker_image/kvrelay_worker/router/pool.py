"""The router's live view of its workers: clients, health, and the load it has put on each."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from kvrelay_worker.prefix_hash import BlockHash
from kvrelay_worker.router.kserve import WorkerClient
from kvrelay_worker.router.prefix_index import PrefixIndex
from kvrelay_worker.router.routing import WorkerLoad, cached_fraction, choose_decode, choose_prefill

log = logging.getLogger(__name__)

# How long a removed worker's calls may keep its channel: the longest drain (drainSeconds <= 3600) and
# a margin; a worker that is really gone ends its calls with an error long before.
RETIRE_TIMEOUT_S = 3700.0

Role = Literal["prefill", "decode"]


@dataclass
class WorkerState:
    client: WorkerClient
    order: int
    healthy: bool = False  # unknown until the first readiness check
    queued_prefill_tokens: int = 0
    running_sequences: int = 0

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            self.client.address, self.healthy, self.queued_prefill_tokens, self.running_sequences, self.order
        )


@dataclass
class RolePool:
    role: Role
    workers: dict[str, WorkerState] = field(default_factory=dict)
    turns: Iterator[int] = field(default_factory=itertools.count)
    # Where streams' leading blocks are likely cached, and what holding them is worth (each role its own
    # index). Prefill: queued tokens per cached prompt token (routing.choose_prefill); decode: running
    # streams per whole input held (routing.choose_decode). None: load alone decides.
    prefix: PrefixIndex | None = None
    prefix_weight: float = 1.0

    def loads(self) -> list[WorkerLoad]:
        return [w.load() for w in self.workers.values()]

    def choose_for_prompt(self, prompt_ids: Sequence[int], exclude: Sequence[str] = ()) -> Choice | None:
        """Prefill: the worker for this prompt, with the prompt tokens it likely holds already; the
        prompt is then recorded as sent there."""
        hashes, cached = self._estimate(prompt_ids)
        loads = [replace(w.load(), cached_prefix_tokens=cached.get(a, 0)) for a, w in self.workers.items()]
        weight = self.prefix_weight if self.prefix is not None else 0.0
        return self._chosen(choose_prefill(loads, exclude, next(self.turns), weight), hashes, cached)

    def choose_for_stream(self, token_ids: Sequence[int], exclude: Sequence[str] = ()) -> Choice | None:
        """Decode: the worker for a stream over these input tokens (fewest streams, less the share of the
        input it likely holds), with its estimate; the input is then recorded as sent there."""
        hashes, cached = self._estimate(token_ids)
        loads = [
            replace(
                w.load(),
                cached_prefix_tokens=cached.get(a, 0),
                cached_prefix_fraction=cached_fraction(cached.get(a, 0), len(token_ids)),
            )
            for a, w in self.workers.items()
        ]
        weight = self.prefix_weight if self.prefix is not None else 0.0
        return self._chosen(choose_decode(loads, exclude, next(self.turns), weight), hashes, cached)

    def record(self, address: str, token_ids: Sequence[int]) -> None:
        """The worker at ``address`` now holds these tokens' KV (a stream it finished: input and output)."""
        if self.prefix is not None:
            self.prefix.record(address, self.prefix.hashes(token_ids))

    def _estimate(self, token_ids: Sequence[int]) -> tuple[list[BlockHash], dict[str, int]]:
        """The tokens' block hashes and, per worker, how many leading tokens it likely holds."""
        index = self.prefix
        if index is None:
            return [], {}
        hashes = index.hashes(token_ids)
        return hashes, {a: index.cached_tokens(a, hashes) for a in self.workers}

    def _chosen(self, address: str | None, hashes: list[BlockHash], cached: dict[str, int]) -> Choice | None:
        """The choice for ``address`` (None: no worker), its blocks recorded as sent there."""
        if address is None:
            return None
        if self.prefix is not None:
            self.prefix.record(address, hashes)
        return Choice(self.workers[address], cached.get(address, 0))

    def forget(self, address: str) -> None:
        """What the router guessed about a worker's cache no longer holds (it left, restarted or failed)."""
        if self.prefix is not None:
            self.prefix.forget(address)


@dataclass(frozen=True)
class Choice:
    worker: WorkerState
    cached_prefix_tokens: int  # the router's estimate; the worker measures the real hits


class WorkerPool:
    """Prefill and decode workers; addresses come from discovery, health from periodic readiness checks."""

    def __init__(
        self,
        health_interval_s: float = 1.0,
        retire_timeout_s: float = RETIRE_TIMEOUT_S,
        prefix: PrefixIndex | None = None,
        prefix_weight: float = 1.0,
        decode_prefix: PrefixIndex | None = None,
        decode_prefix_weight: float = 2.0,
    ) -> None:
        # Separate indexes: a prompt prefilled on one worker says nothing about a decode worker's cache.
        self.roles: dict[Role, RolePool] = {
            "prefill": RolePool("prefill", prefix=prefix, prefix_weight=prefix_weight),
            "decode": RolePool("decode", prefix=decode_prefix, prefix_weight=decode_prefix_weight),
        }
        self._health_interval_s = health_interval_s
        self._retire_timeout_s = retire_timeout_s
        self._order = itertools.count()
        self._health_task: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], WorkerState] = {}
        # Set, then replaced by a fresh one, each time a worker turns ready: what held requests wait on.
        self._turned_ready = asyncio.Event()

    async def set_addresses(self, role: Role, addresses: Sequence[str]) -> None:
        """Apply a discovery update: add new workers (checked at once), retire vanished ones."""
        pool = self.roles[role]
        for address in list(pool.workers):
            if address not in addresses:
                self._retire(pool.workers.pop(address))
                pool.forget(address)
                log.info("%s worker %s removed", role, address)
        new = [a for a in addresses if a not in pool.workers]
        for address in new:
            pool.workers[address] = WorkerState(WorkerClient(address), next(self._order))
            log.info("%s worker %s added", role, address)
        await asyncio.gather(*(self._check(pool.workers[a]) for a in new))

    async def _check(self, worker: WorkerState) -> None:
        ready = await worker.client.is_ready()
        if ready != worker.healthy:
            level = logging.INFO if ready else logging.WARNING
            log.log(level, "worker %s is now %s", worker.client.address, "ready" if ready else "NOT ready")
            if not ready:  # it may come back restarted, its cache empty
                self._forget(worker.client.address)
        was_ready, worker.healthy = worker.healthy, ready
        if ready and not was_ready:
            self._turned_ready.set()
            self._turned_ready = asyncio.Event()

    def _retire(self, worker: WorkerState) -> None:
        """A worker gone from discovery gets no new calls, but the calls it has keep their channel until
        they end: a draining pod leaves its EndpointSlice first and then finishes its streams, which
        closing the channel now would cut."""
        task = asyncio.get_running_loop().create_task(self._close_when_idle(worker))
        self._retiring[task] = worker
        task.add_done_callback(self._retiring.pop)

    async def _close_when_idle(self, worker: WorkerState) -> None:
        deadline = time.monotonic() + self._retire_timeout_s
        try:
            while (worker.running_sequences or worker.queued_prefill_tokens) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        finally:  # also when the pool closes
            await worker.client.close()

    @property
    def retiring(self) -> list[str]:
        """Addresses of removed workers whose calls have not ended yet."""
        return [w.client.address for w in self._retiring.values()]

    def mark_down(self, worker: WorkerState) -> None:
        """A call failed as if the worker were gone: stop routing to it until a readiness check passes."""
        if worker.healthy:
            log.warning("worker %s marked down after a failed call", worker.client.address)
        worker.healthy = False
        self._forget(worker.client.address)

    def _forget(self, address: str) -> None:
        """Drop the cache estimates for ``address`` in every role (the process there may restart empty)."""
        for pool in self.roles.values():
            pool.forget(address)

    async def check_all(self) -> None:
        workers = [w for pool in self.roles.values() for w in pool.workers.values()]
        await asyncio.gather(*(self._check(w) for w in workers))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            await self.check_all()

    def start(self) -> None:
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pool in self.roles.values():
            for worker in pool.workers.values():
                await worker.client.close()
            pool.workers.clear()

    def ready(self) -> bool:
        return all(self.has_ready(role) for role in self.roles)

    def has_ready(self, role: Role) -> bool:
        """Whether `role` has a worker that passed its last readiness check (and no call failed since)."""
        return any(w.healthy for w in self.roles[role].workers.values())

    async def wait_turned_ready(self, timeout_s: float) -> None:
        """Return once some worker turns ready, or after `timeout_s`, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._turned_ready.wait(), timeout_s)
