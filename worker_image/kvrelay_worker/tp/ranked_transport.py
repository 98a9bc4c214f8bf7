"""Rank 0's KV relay for a TP worker: every rank holds and moves its own shard, rank 0 coordinates.

- publish: every rank leases the same block ids under one handle id; rank 0 merges the per-rank
  handles into one signed handle listing every holder rank. The engine frees the blocks only when
  every rank's lease has ended (a block reused while another rank's shard is still being read
  would hand the reader another request's KV).
- fetch: every rank reads its own heads from the holder ranks that have them; the fetch succeeds
  when all ranks did, and fails with the first rank's error otherwise.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import Any

from kvrelay_worker.kv import KVHandle, KVTransferError, KVTransport
from kvrelay_worker.kv.handle import merge_rank_handles
from kvrelay_worker.tp.link import FollowerLinks, RemoteCallError

PUBLISH_TIMEOUT_S = 10.0


class _Pending:
    """Rank leases of one handle still held; ``on_release`` runs when the last one ends."""

    def __init__(self, ranks: int, block_ids: list[int], on_release: Callable[[list[int]], None]) -> None:
        self.left = ranks
        self.block_ids = block_ids
        self.on_release = on_release


class RankedTransport:
    """The KVTransport surface the worker uses (publish, fetch, leases, metrics), over all TP ranks."""

    def __init__(self, local: KVTransport, links: FollowerLinks) -> None:
        self.local = local
        self.links = links
        self.backend = local.backend
        self.layout = local.layout
        self.metrics = local.metrics
        self.leases = local.leases  # rank 0's; the other ranks' leases end with the same publish and reads
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    @property
    def agent_name(self) -> str:
        return self.local.agent_name

    @property
    def endpoint(self) -> str:
        return self.local.endpoint

    def start(self) -> None:
        self.local.start()

    def close(self) -> None:
        self.local.close()

    # ---------------------------------------------------------------- holder
    def publish(
        self, request_id: str, block_ids: list[int], num_tokens: int, on_release: Callable[[list[int]], None]
    ) -> KVHandle:
        """Lease ``block_ids`` on every rank; ``on_release`` once all of them let go."""
        handle_id = uuid.uuid4().hex
        with self._lock:
            self._pending[handle_id] = _Pending(len(self.links.ranks) + 1, list(block_ids), on_release)
        futures = self.links.call_each("publish", (request_id, list(block_ids), num_tokens, handle_id))
        try:
            parts = [
                self.local.publish(
                    request_id,
                    block_ids,
                    num_tokens,
                    lambda _ids: self.released(handle_id),
                    handle_id=handle_id,
                )
            ]
            parts += [KVHandle.model_validate(f.result(PUBLISH_TIMEOUT_S)) for f in futures]
        except Exception as exc:
            # The caller frees the blocks now; the ranks' leases that did start end on their own.
            with self._lock:
                self._pending.pop(handle_id, None)
            raise KVTransferError("publish_failed", f"a TP rank could not publish: {exc}") from exc
        return merge_rank_handles(parts, self.local._secret)

    def released(self, handle_id: str) -> None:
        """One rank's lease on ``handle_id`` ended (rank 0's callback, or another rank's event)."""
        with self._lock:
            pending = self._pending.get(handle_id)
            if pending is None:
                return
            pending.left -= 1
            if pending.left:
                return
            del self._pending[handle_id]
        pending.on_release(pending.block_ids)

    def on_event(self, rank: int, kind: str, value: Any) -> None:
        """FollowerLinks callback."""
        if kind == "released":
            self.released(value)

    # ---------------------------------------------------------------- reader
    async def fetch(
        self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float, skip_blocks: int = 0
    ) -> int:
        """Every rank reads its heads into ``dst_block_ids``; KVTransferError if any rank failed.

        Rank 0's metrics count every rank's bytes and failures (the other ranks export none)."""
        args = (handle.model_dump(mode="json"), list(dst_block_ids), timeout_s, skip_blocks)
        remote = [asyncio.wrap_future(f) for f in self.links.call_each("fetch", args)]
        results = await asyncio.gather(
            self.local.fetch(handle, dst_block_ids, timeout_s, skip_blocks), *remote, return_exceptions=True
        )
        for result in results:
            if isinstance(result, KVTransferError):
                raise result  # counted by rank 0's own transport
            if isinstance(result, RemoteCallError):
                self.metrics.failure(result.reason)
                message = result.message.removeprefix(f"{result.reason}: ")
                raise KVTransferError(result.reason, f"TP rank: {message}") from None
            if isinstance(result, BaseException):
                self.metrics.failure("transfer_error")
                raise KVTransferError("transfer_error", f"{type(result).__name__}: {result}") from result
        remote_bytes = sum(int(r) for r in results[1:])
        self.metrics.transfer_bytes.inc(remote_bytes)
        return int(results[0]) + remote_bytes
