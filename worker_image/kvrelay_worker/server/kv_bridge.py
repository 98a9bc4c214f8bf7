"""P/D coordination between the engine and the KV transport: publish, fetch, release, failure policy.

The servicer only translates KServe messages; everything a request's KV cache goes through
between the prefill and the decode side happens here:

    prefill: engine first token -> publish (lease) ............ reader done / lease expiry -> release
    decode:  expect(handle) -> engine KVTarget -> on_kv_target -> fetch | local hand-off
                                                                -> remote_kv_done(ok) | fail (policy)

Threads: ``publish``, ``expect``, ``forget``, ``drop`` and ``on_kv_target`` run on the event
loop; engine calls go through the ``EngineChannel``; the colocated hand-off runs on the engine
thread (it copies inside the engine's cache); ``on_release`` comes from a transport thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from pydantic import ValidationError

from kvrelay_worker.engine import Engine, KVTarget, RequestOutput
from kvrelay_worker.kv import KVHandle, KVLayoutMismatch, KVTransferError, KVTransport
from kvrelay_worker.server.codec import BadRequest
from kvrelay_worker.server.engine_loop import EngineChannel

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "colocated"]
FailurePolicy = Literal["recompute", "fail"]

LOCAL_READER_RANK = 0  # the colocated role reads its own blocks as reader rank 0 of a TP-1 reader
LOCAL_CLAIM_HOLD_S = 30.0


class KVBridge:
    """One worker's prefill/decode KV coordination over its (optional) transport."""

    def __init__(
        self,
        engine: Engine,
        channel: EngineChannel,
        transport: KVTransport | None,
        *,
        role: Role,
        failure_policy: FailurePolicy = "recompute",
        fetch_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.transport = transport
        self.role = role
        self.failure_policy = failure_policy
        self.fetch_timeout_s = fetch_timeout_s
        self._pending_fetch: dict[str, KVHandle] = {}  # request id -> handle awaiting its KVTarget
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- prefill side --------------------------------------------------------------------------
    def publish(self, request_id: str, out: RequestOutput) -> KVHandle:
        """Hold a prefill-only request's prompt KV under a lease; the engine frees it on release."""
        if self.transport is None:
            self.channel.call_soon(self.engine.release, request_id)
            raise BadRequest("this worker has no KV transport to publish the prompt's KV with")
        try:
            return self.transport.publish(
                request_id,
                out.kv_block_ids or [],
                out.num_prompt_tokens,
                on_release=lambda _ids: self.channel.call_soon(self.engine.release, request_id),
            )
        except Exception:
            self.channel.call_soon(self.engine.release, request_id)
            raise

    # ---- decode side ---------------------------------------------------------------------------
    @staticmethod
    def parse_handle(raw: bytes) -> KVHandle:
        try:
            return KVHandle.from_json(raw)
        except ValidationError as exc:
            raise BadRequest(f"kv_handle is not a valid KVHandle JSON: {exc.errors()[0]['msg']}") from None

    def expect(self, request_id: str, handle: KVHandle) -> None:
        """A remote-KV decode request is about to be queued: fetch ``handle`` when its blocks exist."""
        self._pending_fetch[request_id] = handle

    def forget(self, request_id: str) -> None:
        """The request ended before its KVTarget came (abort, client gone)."""
        self._pending_fetch.pop(request_id, None)

    def drop(self, handle: KVHandle) -> None:
        """Nobody will read ``handle`` (the first token ended the request): let a local lease go now.

        A remote holder frees its blocks at lease expiry.
        """
        if self._is_local(handle):
            self.transport.leases.reader_done(handle.handle_id, LOCAL_READER_RANK)  # type: ignore[union-attr]

    def on_kv_target(self, target: KVTarget) -> None:
        """EngineLoop callback: blocks are allocated for a remote-KV request; fill them."""
        handle = self._pending_fetch.pop(target.request_id, None)
        if handle is None:  # aborted meanwhile, or queued without a handle: recompute
            self.channel.call_soon(self.engine.remote_kv_done, target.request_id, False)
            return
        task = asyncio.create_task(self._fill(handle, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- internals -----------------------------------------------------------------------------
    def _is_local(self, handle: KVHandle) -> bool:
        return (
            self.role == "colocated"
            and self.transport is not None
            and handle.holder.agent_name == self.transport.agent_name
        )

    async def _fill(self, handle: KVHandle, target: KVTarget) -> None:
        """Fetch (or, colocated, copy) the handle's KV into the target's blocks; else the failure policy."""
        try:
            if self.transport is None:
                raise KVTransferError("no_transport", "this worker has no KV transport")
            if handle.num_tokens != target.num_tokens:
                self.transport.metrics.failure("bad_handle")
                raise KVTransferError(
                    "bad_handle", f"handle holds {handle.num_tokens} tokens, prompt has {target.num_tokens}"
                )
            if self._is_local(handle):
                await self.channel.call(self._copy_local, self.transport, handle, target)
            else:
                await self.transport.fetch(handle, target.block_ids, self.fetch_timeout_s, target.skip_blocks)
        except KVTransferError as exc:
            log.warning("KV fetch for %s failed (%s), policy %s", target.request_id, exc, self.failure_policy)
            if self.failure_policy == "fail":
                self.channel.fail(target.request_id, f"KV transfer failed: {exc}")
                self.channel.call_soon(self.engine.abort, target.request_id)
                return
            self.channel.call_soon(self.engine.remote_kv_done, target.request_id, False)
            return
        self.channel.call_soon(self.engine.remote_kv_done, target.request_id, True)

    def _copy_local(self, transport: KVTransport, handle: KVHandle, target: KVTarget) -> None:
        """Engine thread, colocated role: copy the held blocks inside the cache instead of relaying them.

        Raises KVTransferError, counted in ``kvrelay_kv_transfer_failures_total`` like a relay's.
        """
        try:
            now = time.time()
            lease = transport.leases.claim(
                handle.handle_id, LOCAL_READER_RANK, 1, now, now + LOCAL_CLAIM_HOLD_S
            )
            try:
                held = lease.block_ids[target.skip_blocks :]  # the rest this worker's prefix cache holds
                if len(held) != len(target.block_ids):
                    raise KVLayoutMismatch(
                        f"{len(held)} blocks (holder) != {len(target.block_ids)} blocks (reader)"
                    )
                if held:
                    kv_cache = self.engine.kv_cache
                    kv_cache[:, :, target.block_ids] = kv_cache[:, :, held]
            finally:
                transport.leases.reader_done(handle.handle_id, LOCAL_READER_RANK)
        except KVTransferError as exc:
            transport.metrics.failure(exc.reason)
            raise
        except Exception as exc:  # e.g. a device error in the copy: one type for the failure policy
            log.exception("local KV hand-off for %s failed", target.request_id)
            transport.metrics.failure("transfer_error")
            raise KVTransferError("transfer_error", f"local hand-off: {type(exc).__name__}: {exc}") from exc
