"""KVTransport: the holder publishes leased blocks as a signed handle; the reader fetches them.

Threads: the engine may call `publish` from its own thread; `fetch` is a coroutine for the asyncio
server and runs the blocking data path in a private thread pool; a holder service thread expires
leases (and, for NIXL, progresses UCX and reads done-notifications); the control endpoint serves
claims on one thread per connection. `on_release` runs on one of the transport's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import select
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .control import ControlServer, error_frame, recv_frame, send_frame
from .handle import (
    Backend,
    KVHandle,
    KVHolderRank,
    KVLayout,
    KVLayoutMismatch,
    KVTransferError,
    check_compatible,
)
from .leases import Lease, LeaseTable, ReleaseCallback
from .metrics import KVMetrics
from .runs import RunPlan, plan_runs, readers_of, source_slices

log = logging.getLogger(__name__)

# A claim holds the blocks for the reader's remaining deadline, never longer than this.
MAX_CLAIM_HOLD_S = 120.0
CLAIM_MARGIN_S = 2.0


@dataclass(frozen=True)
class Fetch:
    """One reader rank's fetch: what to read from which holder rank, into which blocks, until when."""

    handle: KVHandle
    holder: KVHolderRank
    runs: RunPlan
    dst_block_ids: list[int]
    deadline: float  # monotonic seconds
    cancel: threading.Event
    skip_blocks: int = 0  # leading handle blocks the reader already holds (its prefix cache)


class KVTransport(ABC):
    """One TP rank's KV relay endpoint; both holder (prefill) and reader (decode) sides."""

    backend: Backend

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        tp_rank: int = 0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        secret: bytes | None = None,
        lease_s: float = 30.0,
        metrics: KVMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        expected = (
            layout.num_layers,
            2,
            kv_cache.shape[2],
            layout.num_kv_heads_local,
            layout.block_size,
            layout.head_dim,
        )
        if tuple(kv_cache.shape) != expected or not kv_cache.is_contiguous():
            raise KVLayoutMismatch(
                f"kv_cache shape {tuple(kv_cache.shape)} != contract layout {expected} (contiguous)"
            )
        if str(kv_cache.dtype).removeprefix("torch.") != layout.dtype:
            raise KVLayoutMismatch(f"kv_cache dtype {kv_cache.dtype} != layout dtype {layout.dtype}")
        if not 0 <= tp_rank < layout.tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside tp_size {layout.tp_size}")
        self.kv_cache = kv_cache
        self.layout = layout
        self.tp_rank = tp_rank
        self.num_blocks = int(kv_cache.shape[2])
        self.block_nbytes = layout.block_bytes_local()
        # TP ranks of one holder must share the secret (a merged handle is verified on each rank).
        self._secret = secret or _env_secret() or secrets.token_bytes(32)
        self.lease_s = lease_s
        self.metrics = metrics or KVMetrics(layout.model_id, "unknown")
        self._clock = clock
        self._host, self._port = host, port
        self._advertise_host = advertise_host or host
        self.agent_name = f"kvrelay-{self.backend}-r{tp_rank}-{uuid.uuid4().hex[:12]}"
        self.leases = LeaseTable(on_change=self.metrics.set_held)
        self._server: ControlServer | None = None
        self._stop = threading.Event()
        self._service: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="kv-fetch")
        self._cancels: set[threading.Event] = set()  # one per fetch in flight; close() sets them all
        # Idle control connections per holder endpoint: saves a connect and a holder thread per claim.
        self._idle: dict[str, list[socket.socket]] = {}
        self._idle_lock = threading.Lock()
        self._started = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Register memory, open the control endpoint and start the holder service thread."""
        if self._started:
            return
        self._start_backend()
        self._server = ControlServer(self._host, self._port, self._serve_connection, self.agent_name)
        self._server.start()
        self._service = threading.Thread(
            target=self._service_loop, name=f"{self.agent_name}-svc", daemon=True
        )
        self._service.start()
        self._started = True

    def close(self) -> None:
        """Stop threads, release every held lease, deregister memory."""
        if not self._started:
            return
        self._stop.set()
        for cancel in list(self._cancels):  # in-flight fetches stop at their next poll, not their deadline
            cancel.set()
        if self._server is not None:
            self._server.close()
        if self._service is not None:
            self._service.join(timeout=5)
        self.leases.release_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._idle_lock:
            for socks in self._idle.values():
                for sock in socks:
                    sock.close()
            self._idle.clear()
        self._close_backend()
        self._started = False

    def __enter__(self) -> KVTransport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("transport not started")
        return f"{self._advertise_host}:{self._server.port}"

    # ---------------------------------------------------------------- holder side
    def publish(
        self,
        request_id: str,
        block_ids: list[int],
        num_tokens: int,
        on_release: ReleaseCallback,
        handle_id: str | None = None,
    ) -> KVHandle:
        """Hold `block_ids` under a lease and return a signed handle for this rank.

        With holder TP > 1 every rank publishes with the same `handle_id` and rank 0 merges the
        parts (`merge_rank_handles`). `on_release(block_ids)` is called exactly once.
        """
        if self._server is None:
            raise RuntimeError("transport not started")
        needed = -(-num_tokens // self.layout.block_size)
        if len(block_ids) != needed:
            raise ValueError(
                f"{num_tokens} tokens need {needed} blocks of {self.layout.block_size}, got {len(block_ids)}"
            )
        expires = self._clock() + self.lease_s
        me = KVHolderRank(
            rank=self.tp_rank,
            agent_name=self.agent_name,
            endpoint=self.endpoint,
            block_ids=list(block_ids),
            num_blocks_total=self.num_blocks,
            **self._rank_memory_fields(),
        )
        handle = KVHandle(
            handle_id=handle_id or uuid.uuid4().hex,
            request_id=request_id,
            backend=self.backend,
            holder=me,
            layout=self.layout,
            ranks=[me],
            num_tokens=num_tokens,
            lease_expires_at=expires,
        ).signed(self._secret)
        self.leases.add(
            Lease(handle, list(block_ids), len(block_ids) * self.block_nbytes, expires, on_release)
        )
        return handle

    def _validate_claim(self, req: dict[str, Any]) -> tuple[Lease, KVLayout, list[int]]:
        """Refuse forged, foreign, incompatible, unknown or expired handles; hold the blocks. Returns
        the lease, the reader's layout and the held blocks to serve (past the reader's cached ones)."""
        try:
            handle = KVHandle.model_validate(req["handle"])
            reader_rank = int(req["reader_rank"])
            reader_tp = int(req["reader_tp_size"])
            dst_block_ids = [int(b) for b in req["dst_block_ids"]]
            skip = int(req.get("skip_blocks", 0))
            deadline_s = float(req["deadline_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KVTransferError("bad_request", f"malformed claim: {exc}") from exc
        if not handle.verify(self._secret):
            raise KVTransferError(
                "bad_signature", f"handle {handle.handle_id} signature does not verify (forged or edited)"
            )
        if handle.layout != self.layout:
            raise KVLayoutMismatch(f"handle layout {handle.layout} (handle) != {self.layout} (holder)")
        reader_layout = handle.layout.model_copy(update={"tp_size": reader_tp})
        check_compatible(self.layout, reader_layout)
        readers = readers_of(self.layout, reader_layout, self.tp_rank)
        if reader_rank not in readers:
            raise KVTransferError(
                "bad_request", f"reader rank {reader_rank} does not read from holder rank {self.tp_rank}"
            )
        now = self._clock()
        hold = now + min(max(deadline_s, 0.0), MAX_CLAIM_HOLD_S) + CLAIM_MARGIN_S
        lease = self.leases.claim(handle.handle_id, reader_rank, len(readers), now, hold)
        if not 0 <= skip <= len(lease.block_ids):
            raise KVTransferError("bad_request", f"skip_blocks {skip} outside 0..{len(lease.block_ids)}")
        served = lease.block_ids[skip:]
        if len(dst_block_ids) != len(served):
            raise KVLayoutMismatch(
                f"{len(served)} blocks (holder, {skip} skipped) != {len(dst_block_ids)} destination blocks "
                "(reader)"
            )
        return lease, reader_layout, served

    def _serve_connection(self, sock: socket.socket) -> None:
        while True:
            try:
                req = recv_frame(sock)
            except ConnectionError:
                return
            op = req.get("op")
            try:
                if op == "claim":
                    lease, reader_layout, served = self._validate_claim(req)
                    self._serve_claim(sock, req, lease, reader_layout, served)
                else:
                    self._serve_other(sock, req)
            except KVTransferError as err:
                send_frame(sock, error_frame(err))

    def _service_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.leases.expire(self._clock())
                self._progress()
            except Exception:  # keep expiring leases whatever the backend does
                log.exception("KV holder service tick failed")
                self._stop.wait(0.1)

    # ---------------------------------------------------------------- reader side
    async def fetch(
        self, handle: KVHandle, dst_block_ids: list[int], timeout_s: float, skip_blocks: int = 0
    ) -> int:
        """Copy the handle's blocks (this rank's head slice) into `dst_block_ids` and return the bytes
        moved, or raise KVTransferError.

        `skip_blocks`: the first blocks of the handle are not read (the reader's prefix cache holds
        them); `dst_block_ids` receives the rest, and may be empty: the claim then only tells the
        holder it may free the blocks. Never takes longer than `timeout_s` (plus one poll interval);
        on any failure or cancel the destination blocks are no longer written when this returns.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        cancel = threading.Event()
        self._cancels.add(cancel)
        try:
            if self._clock() >= handle.lease_expires_at:
                raise KVTransferError(
                    "expired", f"handle {handle.handle_id} lease expired at {handle.lease_expires_at:.3f}"
                )
            if handle.backend != self.backend:
                raise KVTransferError(
                    "bad_handle", f"backend {handle.backend} (holder) != {self.backend} (reader)"
                )
            # Reader TP below the holder's: this rank's heads sit on several holder ranks, one claim each.
            sources = source_slices(handle.layout, self.layout, self.tp_rank)
            holders = [handle.rank(s.holder_rank) for s in sources]
            dst = list(dst_block_ids)
            for holder in holders:
                if not 0 <= skip_blocks <= len(holder.block_ids):
                    raise KVTransferError(
                        "bad_request", f"skip_blocks {skip_blocks} outside 0..{len(holder.block_ids)}"
                    )

            def work() -> int:  # planning thousands of runs stays off the event loop too
                total = 0
                for source, holder in zip(sources, holders, strict=True):
                    runs = plan_runs(
                        handle.layout, holder.num_blocks_total, holder.block_ids[skip_blocks:], self.layout,
                        self.num_blocks, self.tp_rank, dst, source.holder_rank,
                    )  # fmt: skip
                    job = Fetch(handle, holder, runs, dst, deadline, cancel, skip_blocks)
                    total += self._fetch_blocking(job)
                return total

            fut = asyncio.get_running_loop().run_in_executor(self._pool, work)
            try:
                nbytes = await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()  # the worker thread stops writing into our blocks before we return
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(fut), timeout=5)
                raise
        except KVTransferError as err:
            self.metrics.failure(err.reason)
            raise
        except Exception as exc:  # a backend library error must reach the failure policy as one type
            self.metrics.failure("transfer_error")
            raise KVTransferError("transfer_error", f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._cancels.discard(cancel)
        self.metrics.transfer_seconds.observe(time.monotonic() - started)
        self.metrics.transfer_bytes.inc(nbytes)
        return nbytes

    def claim_request(self, job: Fetch) -> dict[str, Any]:
        return {
            "op": "claim",
            "handle": job.handle.model_dump(mode="json"),
            "reader_rank": self.tp_rank,
            "reader_tp_size": self.layout.tp_size,
            "reader_num_blocks": self.num_blocks,
            "dst_block_ids": job.dst_block_ids,
            "skip_blocks": job.skip_blocks,
            "deadline_s": max(job.deadline - time.monotonic(), 0.0),
        }

    def open_claim(
        self, endpoint: str, req: dict[str, Any], deadline: float, cancel: threading.Event
    ) -> tuple[socket.socket, dict[str, Any]]:
        """Claim on a pooled (or new) connection; the caller returns it with `reuse` or closes it."""
        sock, pooled = self.send_claim(endpoint, req, deadline)
        return self.claim_reply(sock, pooled, endpoint, req, deadline, cancel)

    def send_claim(self, endpoint: str, req: dict[str, Any], deadline: float) -> tuple[socket.socket, bool]:
        """Send a claim without waiting for the answer: (connection, whether it came from the pool)."""
        with self._idle_lock:
            idle = self._idle.get(endpoint)
            sock = idle.pop() if idle else None
        if sock is not None:
            try:
                send_frame(sock, req)
                return sock, True
            except OSError:
                sock.close()  # a stale pooled connection (holder restarted): use a fresh one
        return self._send_fresh(endpoint, req, deadline), False

    def _send_fresh(self, endpoint: str, req: dict[str, Any], deadline: float) -> socket.socket:
        sock = connect(endpoint, deadline)
        try:
            send_frame(sock, req)
        except OSError as exc:
            sock.close()
            raise _dropped(endpoint, exc) from exc
        return sock

    def claim_reply(
        self,
        sock: socket.socket,
        pooled: bool,
        endpoint: str,
        req: dict[str, Any],
        deadline: float,
        cancel: threading.Event,
    ) -> tuple[socket.socket, dict[str, Any]]:
        """Wait for the answer to a sent claim: (the connection that answered, the reply).

        A stale pooled connection is retried once on a fresh one. On error every connection is
        closed; on success the caller returns it with `reuse` or closes it.
        """
        try:
            return sock, await_claim_reply(sock, endpoint, deadline, cancel)
        except KVTransferError as err:
            sock.close()
            if not (pooled and err.reason == "holder_unreachable"):
                raise
        sock = self._send_fresh(endpoint, req, deadline)
        try:
            return sock, await_claim_reply(sock, endpoint, deadline, cancel)
        except BaseException:
            sock.close()
            raise

    def reuse(self, endpoint: str, sock: socket.socket) -> None:
        """Keep a healthy control connection for the next claim to the same holder."""
        sock.settimeout(None)
        with self._idle_lock:
            idle = self._idle.setdefault(endpoint, [])
            if len(idle) < 8 and not self._stop.is_set():
                idle.append(sock)
                return
        sock.close()

    # ---------------------------------------------------------------- backend hooks
    @abstractmethod
    def _start_backend(self) -> None: ...

    @abstractmethod
    def _close_backend(self) -> None: ...

    def _rank_memory_fields(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _serve_claim(
        self,
        sock: socket.socket,
        req: dict[str, Any],
        lease: Lease,
        reader_layout: KVLayout,
        served: list[int],
    ) -> None:
        """Holder: answer a validated claim for the held blocks `served` (and, for tcp, stream the runs)."""

    def _serve_other(self, sock: socket.socket, req: dict[str, Any]) -> None:
        raise KVTransferError("bad_request", f"unknown op {req.get('op')!r}")

    @abstractmethod
    def _progress(self) -> None:
        """Holder service tick: wait a little, progressing the backend (must return within ~50 ms)."""

    @abstractmethod
    def _fetch_blocking(self, job: Fetch) -> int:
        """Reader: move `job.runs` into the local kv_cache before `job.deadline`; return bytes moved."""


def _env_secret() -> bytes | None:
    value = os.environ.get("KVRELAY_KV_SECRET")
    return value.encode() if value else None


def connect(endpoint: str, deadline: float) -> socket.socket:
    """Connect to a holder's control endpoint within the deadline (monotonic)."""
    from .control import split_endpoint

    host, port = split_endpoint(endpoint)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise KVTransferError("timeout", f"deadline passed before connecting to {endpoint}")
    try:
        sock = socket.create_connection((host, port), timeout=remaining)
    except TimeoutError as exc:
        raise KVTransferError("timeout", f"connecting to holder {endpoint} timed out") from exc
    except OSError as exc:
        raise KVTransferError("holder_unreachable", f"cannot connect to holder {endpoint}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def await_claim_reply(
    sock: socket.socket, endpoint: str, deadline: float, cancel: threading.Event
) -> dict[str, Any]:
    """Wait for the holder's answer to a claim, checking the deadline and cancel flag."""
    try:
        while not select.select([sock], [], [], 0.05)[0]:
            if cancel.is_set():
                raise KVTransferError("cancelled", "fetch cancelled while waiting for the claim")
            if time.monotonic() >= deadline:
                raise KVTransferError("timeout", f"holder {endpoint} did not answer the claim in time")
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        reply = recv_frame(sock)
    except TimeoutError as exc:
        raise KVTransferError("timeout", f"holder {endpoint} did not answer the claim in time") from exc
    except (ConnectionError, OSError) as exc:
        raise _dropped(endpoint, exc) from exc
    if not reply.get("ok"):
        raise KVTransferError(reply.get("reason", "refused"), reply.get("message", ""))
    return reply


def _dropped(endpoint: str, exc: BaseException) -> KVTransferError:
    return KVTransferError("holder_unreachable", f"holder {endpoint} dropped the claim: {exc}")
