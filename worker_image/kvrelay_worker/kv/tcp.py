"""Plain TCP backend: the holder streams the reader's runs straight from its kv_cache memory.

Zero-copy on CPU: the holder gather-writes (`sendmsg`) memoryviews of its tensor's runs and the
reader scatter-reads (`recvmsg_into`) straight into memoryviews of its own blocks. The bulk path
uses blocking sockets in threads (the asyncio API wraps it): on loopback, per-call event-loop
overhead would cost a large share of the throughput.
CUDA tensors are staged through host memory one run at a time.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Any

import torch

from .base import Fetch, KVTransport
from .control import recv_frame, send_frame
from .handle import KVLayout, KVTransferError
from .leases import Lease
from .runs import plan_runs

_POLL_S = 0.25  # socket timeout slice: how often a blocked reader checks its deadline/cancel flag
_RCVTIMEO = struct.pack("ll", 0, int(_POLL_S * 1e6))  # struct timeval
_NO_RCVTIMEO = struct.pack("ll", 0, 0)
_IOV_BATCH = 512  # buffers per sendmsg/recvmsg_into call (Linux IOV_MAX is 1024)


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (same memory)."""
    return tensor.reshape(-1).view(torch.uint8)


class TcpTransport(KVTransport):
    """KV relay over plain TCP (clusters without NIXL)."""

    backend = "tcp"

    def _start_backend(self) -> None:
        self._bytes = byte_view(self.kv_cache)
        self._on_cpu = self.kv_cache.device.type == "cpu"
        self._host_view = memoryview(self._bytes.numpy()) if self._on_cpu else None

    def _close_backend(self) -> None:
        self._host_view = None

    def _progress(self) -> None:
        # Nothing to progress: just wake up for lease expiry (or stop) at a modest rate.
        nxt = self.leases.next_expiry()
        wait = 0.05 if nxt is None else min(max(nxt - self._clock(), 0.001), 0.05)
        self._stop.wait(wait)

    # ---------------------------------------------------------------- holder
    def _serve_claim(
        self,
        sock: socket.socket,
        req: dict[str, Any],
        lease: Lease,
        reader_layout: KVLayout,
        served: list[int],
    ) -> None:
        runs = plan_runs(
            self.layout, self.num_blocks, served, reader_layout, int(req["reader_num_blocks"]),
            int(req["reader_rank"]), [int(b) for b in req["dst_block_ids"]], self.tp_rank,
        )  # fmt: skip
        nbytes = int(runs[:, 2].sum())
        send_frame(sock, {"ok": True, "nbytes": nbytes})
        if self._host_view is not None:
            send_views(sock, [self._host_view[src : src + length] for src, _, length in runs.tolist()])
        else:
            for src, _, length in runs.tolist():  # device memory: stage one run at a time through host memory
                sock.sendall(memoryview(self._bytes[src : src + length].cpu().numpy()))
        sock.settimeout(max(float(req["deadline_s"]), 0.0) + 1.0)
        done = recv_frame(sock)
        sock.settimeout(None)
        if done.get("op") == "done":
            self.leases.reader_done(lease.handle.handle_id, int(req["reader_rank"]))

    # ---------------------------------------------------------------- reader
    def _fetch_blocking(self, job: Fetch) -> int:
        holder, runs, deadline, cancel = job.holder, job.runs, job.deadline, job.cancel
        request = self.claim_request(job)
        sock, reply = self.open_claim(holder.endpoint, request, deadline, cancel)
        try:
            total = int(runs[:, 2].sum())
            if int(reply["nbytes"]) != total:
                raise KVTransferError(
                    "layout_mismatch", f"{reply['nbytes']} bytes (holder) != {total} (reader)"
                )
            if self._host_view is not None:
                views = [self._host_view[dst : dst + length] for _, dst, length in runs.tolist()]
                recv_views(sock, views, deadline, cancel, holder.endpoint)
            else:
                for _, dst, length in runs.tolist():
                    staging = torch.empty(length, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                    recv_views(sock, [memoryview(staging.numpy())], deadline, cancel, holder.endpoint)
                    self._bytes[dst : dst + length].copy_(staging)
            send_frame(sock, {"op": "done"})
        except BaseException:
            sock.close()  # mid-stream: the connection's state is unknown
            raise
        self.reuse(holder.endpoint, sock)
        return total


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first `n` bytes from a list of views, in place."""
    while n and n >= len(views[0]):
        n -= len(views.pop(0))
    if n:
        views[0] = views[0][n:]


def send_views(sock: socket.socket, views: list[memoryview]) -> None:
    """sendall for many buffers: gather-writes (sendmsg) of up to _IOV_BATCH views per syscall."""
    views = [v for v in views if len(v)]
    while views:
        _advance(views, sock.sendmsg(views[:_IOV_BATCH]))


def recv_views(
    sock: socket.socket, views: list[memoryview], deadline: float, cancel: threading.Event, peer: str
) -> None:
    """Scatter-read exactly the views' bytes (recvmsg_into), checking the deadline and cancel flag."""
    views = [v for v in views if len(v)]
    # A blocking socket with a kernel receive timeout (SO_RCVTIMEO) instead of settimeout() (which
    # polls before every read), and MSG_WAITALL: the kernel keeps filling the views as data arrives
    # instead of returning to Python per chunk; a timeout slice returns what it has so far.
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
    try:
        while views:
            if cancel.is_set() or time.monotonic() >= deadline:
                reason = "cancelled" if cancel.is_set() else "timeout"
                raise KVTransferError(reason, f"reading from holder {peer} stopped: {reason}")
            try:
                got = sock.recvmsg_into(views[:_IOV_BATCH], 0, socket.MSG_WAITALL)[0]
            except (BlockingIOError, TimeoutError, InterruptedError):
                continue  # the timeout slice passed: re-check the deadline and the cancel flag
            except OSError as exc:
                raise KVTransferError(
                    "holder_unreachable", f"holder {peer} connection failed: {exc}"
                ) from exc
            if got == 0:
                raise KVTransferError(
                    "holder_unreachable", f"holder {peer} closed the connection mid-transfer"
                )
            _advance(views, got)
    finally:
        with contextlib.suppress(OSError):  # the socket may already be closed (transport close)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_RCVTIMEO)
