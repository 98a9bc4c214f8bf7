"""NIXL backend: the reader READs the holder's runs straight into its own registered blocks.

Flow per fetch: claim over the holder's control endpoint (verifies signature, lease, layout; the
reply carries the NIXL agent metadata the first time this reader meets that holder), then one
NIXL READ of all runs with a done-notification; the holder's service thread polls notifications
(which also progresses UCX: emulated TCP READs and connection wire-up need the target to progress)
and releases the lease when every reader rank is done. The kv_cache is registered once at start.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from .base import Fetch, KVTransport
from .control import send_frame
from .handle import KVHandle, KVHolderRank, KVLayout, KVTransferError
from .leases import Lease
from .runs import slice_bytes, source_slice

log = logging.getLogger(__name__)

_NOTIF_PREFIX = b"kvrelay-done:"
_IDLE_POLL_S = 0.01  # holder idle: poll notifications at 100 Hz
_ACTIVE_POLL_S = 0.0002  # a claim is in flight: progress UCX often (emulated READ over tcp needs it)
_ACTIVE_WINDOW_S = 0.05  # keep polling fast this long after the last notification
_XFER_POLL_S = 0.00005
_XFER_POLL_MAX_S = 0.001


# NIXL's UCX thread-pool engine splits one READ's descriptors over dedicated worker threads: on
# one host a cma READ is a kernel copy run by the posting thread, so one thread tops out near 0.7x
# memcpy; two reach memcpy speed (bench/kv_transfer.py). The threads wait on events, not spin.
# A READ with fewer than `split_batch_size` runs stays on the calling thread (no hand-off).
DEFAULT_BACKEND_PARAMS = {"num_threads": "2", "split_batch_size": "8"}


def ucx_backend_params(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """UCX backend parameters: the defaults, then KVRELAY_UCX_BACKEND_PARAMS ("k=v,k=v"), then `overrides`.

    `num_threads=0` turns the thread pool off; `ucx_error_handling_mode=none` is needed for UCX_TLS=shm.
    """
    raw = os.environ.get("KVRELAY_UCX_BACKEND_PARAMS", "")
    params = dict(DEFAULT_BACKEND_PARAMS)
    params.update(item.split("=", 1) for item in raw.split(",") if "=" in item)
    params.update(overrides or {})
    if params.get("num_threads") == "0":
        del params["num_threads"]
    return params


_MADV_COLLAPSE = 25  # Linux >= 6.1
_HUGEPAGE = 2 << 20


def collapse_to_hugepages(addr: int, nbytes: int) -> bool:
    """Best effort: back a host buffer with 2 MiB pages (MADV_COLLAPSE).

    CMA reads pin every source and destination page; with 4 KiB pages that costs about half the
    bandwidth. The engine's cache is already faulted in, so only a synchronous collapse helps.
    """
    start = (addr + _HUGEPAGE - 1) // _HUGEPAGE * _HUGEPAGE
    end = (addr + nbytes) // _HUGEPAGE * _HUGEPAGE
    if end <= start or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ok = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_COLLAPSE) == 0
    if not ok:
        log.debug("MADV_COLLAPSE not applied: %s", os.strerror(ctypes.get_errno()))
    return ok


def _import_nixl() -> Any:
    try:
        import nixl_cu12 as nixl_mod
    except ImportError:  # the `nixl` meta package exposes the same API
        from nixl import _api as nixl_mod  # type: ignore[no-redef]
    return nixl_mod


class NixlTransport(KVTransport):
    """KV relay over NIXL (UCX: RDMA/GPUDirect in a cluster; cma/shm or tcp on one host)."""

    backend = "nixl"

    def __init__(self, *args: Any, backend_params: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backend_params = ucx_backend_params(backend_params)
        self._peers: set[str] = set()  # remote agents whose metadata is loaded
        self._peer_lock = threading.Lock()
        self._active_until = 0.0
        # Claimed, not yet done: (handle id, reader rank) -> monotonic deadline. Only these need the
        # holder to progress UCX quickly; idle polling must not steal a core from the readers.
        self._inflight: dict[tuple[str, int], float] = {}
        self._inflight_lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle
    def _start_backend(self) -> None:
        nixl = _import_nixl()
        config = nixl.nixl_agent_config(
            enable_prog_thread=False,  # a busy-polling thread costs more than it gives on few cores
            backends=[],
            sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,  # engine, server, service threads
        )
        self._agent = nixl.nixl_agent(self.agent_name, config)
        self._agent.create_backend("UCX", self._backend_params)
        if self.kv_cache.device.type == "cpu" and os.environ.get("KVRELAY_KV_HUGEPAGES", "1") != "0":
            collapse_to_hugepages(
                self.kv_cache.data_ptr(), self.kv_cache.numel() * self.kv_cache.element_size()
            )
        self._reg = self._agent.register_memory(self.kv_cache)
        self._metadata = self._agent.get_agent_metadata()
        cuda = self.kv_cache.device.type == "cuda"
        self._mem_type = "VRAM" if cuda else "DRAM"
        self._device_id = (self.kv_cache.device.index or 0) if cuda else 0
        self._base = self.kv_cache.data_ptr()

    def _close_backend(self) -> None:
        with self._peer_lock:
            for peer in list(self._peers):
                self._forget_peer_locked(peer)
        try:
            self._agent.deregister_memory(self._reg)
        except Exception:  # teardown is best effort; the process may be exiting anyway
            log.debug("deregister_memory failed", exc_info=True)

    def _rank_memory_fields(self) -> dict[str, Any]:
        return {"base_addr": self._base, "mem_type": self._mem_type, "device_id": self._device_id}

    # ---------------------------------------------------------------- holder
    def _serve_claim(
        self,
        sock: socket.socket,
        req: dict[str, Any],
        lease: Lease,
        reader_layout: KVLayout,
        served: list[int],
    ) -> None:
        deadline = time.monotonic() + max(float(req["deadline_s"]), _ACTIVE_WINDOW_S)
        with self._inflight_lock:
            self._inflight[(lease.handle.handle_id, int(req["reader_rank"]))] = deadline
        # The reader plans and reads the runs itself; the holder only states how many bytes it serves.
        source = source_slice(self.layout, reader_layout, int(req["reader_rank"]), self.tp_rank)
        nbytes = slice_bytes(self.layout, source, len(served))
        reply: dict[str, Any] = {"ok": True, "nbytes": nbytes}
        if req.get("want_metadata"):
            reply["metadata_b64"] = base64.b64encode(self._metadata).decode()
        send_frame(sock, reply)

    def _progress(self) -> None:
        notifs = self._agent.get_new_notifs()
        now = time.monotonic()
        for messages in notifs.values():
            for msg in messages:
                if msg.startswith(_NOTIF_PREFIX):
                    handle_id, _, rank = msg[len(_NOTIF_PREFIX) :].decode().partition(":")
                    self.leases.reader_done(handle_id, int(rank))
                    with self._inflight_lock:
                        self._inflight.pop((handle_id, int(rank)), None)
        if notifs:
            self._active_until = now + _ACTIVE_WINDOW_S
        with self._inflight_lock:
            for key in [k for k, until in self._inflight.items() if until < now]:
                del self._inflight[key]  # the reader gave up (deadline): stop fast polling for it
            busy = bool(self._inflight)
        if busy or now < self._active_until:
            time.sleep(_ACTIVE_POLL_S)
        else:
            nxt = self.leases.next_expiry()
            wait = _IDLE_POLL_S if nxt is None else min(max(nxt - self._clock(), 0.0005), _IDLE_POLL_S)
            self._stop.wait(wait)

    # ---------------------------------------------------------------- reader
    def _fetch_blocking(self, job: Fetch) -> int:
        handle, holder, deadline, cancel = job.handle, job.holder, job.deadline, job.cancel
        peer = holder.agent_name
        with self._peer_lock:
            known = peer in self._peers
        req = self.claim_request(job)
        req["want_metadata"] = not known
        total = int(job.runs[:, 2].sum())
        reads = len(job.runs) > 0  # none when the reader's prefix cache holds every block
        sock, pooled = self.send_claim(holder.endpoint, req, deadline)
        xfer = None
        try:
            if known and reads:
                # The READ overlaps the claim's round trip. Safe: blocks stay held from publish until
                # the lease ends or the claim's hold does, so if the claim succeeds they were held
                # during the whole READ; if it fails, what landed in our blocks is never used.
                xfer = self._start_read(job)
            sock, reply = self.claim_reply(sock, pooled, holder.endpoint, req, deadline, cancel)
            self.reuse(holder.endpoint, sock)
            if not known:
                self._add_peer(peer, base64.b64decode(reply["metadata_b64"]))
            if int(reply["nbytes"]) != total:
                mismatch = f"{reply['nbytes']} bytes (holder) != {total} (reader)"
                raise KVTransferError("layout_mismatch", mismatch)
            if xfer is None and reads:
                xfer = self._start_read(job)
            if xfer is not None:
                self._finish_read(holder, xfer, deadline, cancel)
        except KVTransferError as err:
            if xfer is not None:  # cancel it before its peer may be unloaded below
                self._release_xfer(handle, xfer)
                xfer = None
            if err.reason in ("transfer_error", "timeout", "holder_unreachable"):
                # A failed peer's endpoint is unusable; reload its metadata on the next fetch.
                with self._peer_lock:
                    self._forget_peer_locked(peer)
            raise
        finally:
            if xfer is not None:
                self._release_xfer(handle, xfer)
        # Only now may the holder free the blocks: a notification bound to the READ could arrive
        # before the holder has even seen the claim.
        try:
            self._agent.send_notif(peer, _NOTIF_PREFIX + f"{handle.handle_id}:{self.tp_rank}".encode())
        except Exception:  # the bytes are ours already; without the notice the lease frees them
            log.warning("done-notice to %s for %s failed", peer, handle.handle_id, exc_info=True)
        return total

    def _add_peer(self, peer: str, metadata: bytes) -> None:
        with self._peer_lock:
            if peer in self._peers:
                return
            loaded = self._agent.add_remote_agent(metadata)
            name = loaded.decode() if isinstance(loaded, bytes) else loaded
            if name != peer:
                raise KVTransferError(
                    "bad_handle", f"holder metadata is for agent {name}, handle says {peer}"
                )
            self._peers.add(peer)

    def _forget_peer_locked(self, peer: str) -> None:
        if peer in self._peers:
            self._peers.discard(peer)
            try:
                self._agent.remove_remote_agent(peer)
            except Exception:
                log.debug("remove_remote_agent(%s) failed", peer, exc_info=True)

    def _start_read(self, job: Fetch) -> Any:
        """Post one NIXL READ of all runs (a cma READ may complete inside this call)."""
        handle, holder = job.handle, job.holder
        arr = job.runs.astype(np.uint64)  # columns: src, dst, length
        remote = np.empty_like(arr)
        remote[:, 0] = arr[:, 0] + np.uint64(holder.base_addr)
        remote[:, 1] = arr[:, 2]
        remote[:, 2] = holder.device_id
        local = np.empty_like(arr)
        local[:, 0] = arr[:, 1] + np.uint64(self._base)
        local[:, 1] = arr[:, 2]
        local[:, 2] = self._device_id
        agent = self._agent
        try:
            xfer = agent.initialize_xfer(
                "READ",
                agent.get_xfer_descs(local, self._mem_type),
                agent.get_xfer_descs(remote, holder.mem_type),
                holder.agent_name,
            )
        except Exception as exc:  # nixlBind raises its own error types
            raise KVTransferError(
                "transfer_error", f"cannot set up READ from {holder.agent_name}: {exc}"
            ) from exc
        if job.cancel.is_set():  # last chance not to write into our blocks
            self._release_xfer(handle, xfer)
            raise KVTransferError("cancelled", "fetch cancelled")
        try:
            state = agent.transfer(xfer)
        except Exception as exc:
            self._release_xfer(handle, xfer)
            raise KVTransferError("transfer_error", f"READ from {holder.endpoint} failed: {exc}") from exc
        if state not in ("PROC", "DONE"):
            self._release_xfer(handle, xfer)
            raise KVTransferError("transfer_error", f"READ from holder {holder.endpoint} failed ({state})")
        return xfer

    def _finish_read(self, holder: KVHolderRank, xfer: Any, deadline: float, cancel: threading.Event) -> None:
        """Wait for a posted READ, checking the deadline and cancel flag."""
        agent = self._agent
        started = time.monotonic()
        state = agent.check_xfer_state(xfer)
        while state == "PROC":
            if cancel.is_set():
                raise KVTransferError("cancelled", "fetch cancelled")
            if time.monotonic() >= deadline:
                raise KVTransferError("timeout", f"READ from holder {holder.endpoint} passed the deadline")
            # Sleep about 1/16 of the time spent so far: short READs are seen done within ~50 us,
            # long ones add < 7% while leaving the cores to the threads doing the copy.
            time.sleep(min(max((time.monotonic() - started) / 16, _XFER_POLL_S), _XFER_POLL_MAX_S))
            state = agent.check_xfer_state(xfer)
        if state != "DONE":
            raise KVTransferError("transfer_error", f"READ from holder {holder.endpoint} failed ({state})")

    def _release_xfer(self, handle: KVHandle, xfer: Any) -> None:
        try:
            # Releasing an active transfer cancels it, so our blocks are no longer written.
            self._agent.release_xfer_handle(xfer)
        except Exception:
            log.warning("could not cancel/release NIXL transfer for %s", handle.handle_id, exc_info=True)
