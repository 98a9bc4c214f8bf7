"""Holder-side leases: blocks held for a reader until it reports done or the lease expires."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .handle import KVHandle, KVTransferError

ReleaseCallback = Callable[[list[int]], None]

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """One published handle's blocks on this holder rank."""

    handle: KVHandle
    block_ids: list[int]
    nbytes: int
    expires_at: float
    on_release: ReleaseCallback
    expected_readers: int | None = None  # set by the first claim (depends on the reader's TP degree)
    done_readers: set[int] = field(default_factory=set)


class LeaseTable:
    """Thread-safe table of leases; every decision takes `now` so tests drive a virtual clock.

    `on_release` runs exactly once per lease, outside the lock, in the thread that released it.
    """

    def __init__(self, on_change: Callable[[int, int], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._on_change = on_change  # (held_blocks, held_bytes) -> None, e.g. gauges

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.handle.handle_id] = lease
        self._changed()

    def claim(
        self, handle_id: str, reader_rank: int, expected_readers: int, now: float, hold_until: float
    ) -> Lease:
        """A reader starts reading: refuse unknown/expired handles; keep the blocks until `hold_until`."""
        with self._lock:
            lease = self._leases.get(handle_id)
            if lease is None:
                raise KVTransferError(
                    "unknown_handle", f"handle {handle_id} is not held here (released or never published)"
                )
            if now >= lease.expires_at:
                raise KVTransferError(
                    "expired", f"handle {handle_id} lease expired at {lease.expires_at:.3f}"
                )
            if lease.expected_readers not in (None, expected_readers):
                raise KVTransferError("layout_mismatch", "readers of one handle disagree on their TP degree")
            lease.expected_readers = expected_readers
            # The read must never race a release: hold the blocks for the reader's whole deadline.
            lease.expires_at = max(lease.expires_at, hold_until)
            return lease

    def reader_done(self, handle_id: str, reader_rank: int) -> bool:
        """Record a reader's done; release when every expected reader is done. True if released."""
        with self._lock:
            lease = self._leases.get(handle_id)
            if lease is None:
                return False
            lease.done_readers.add(reader_rank)
            if len(lease.done_readers) < (lease.expected_readers or 1):
                return False
            del self._leases[handle_id]
        self._release(lease)
        return True

    def expire(self, now: float) -> list[str]:
        """Release every lease whose expiry has passed; returns their handle ids."""
        with self._lock:
            gone = [hid for hid, lease in self._leases.items() if now >= lease.expires_at]
            leases = [self._leases.pop(hid) for hid in gone]
        for lease in leases:
            self._release(lease)
        return gone

    def release_all(self) -> None:
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
        for lease in leases:
            self._release(lease)

    def next_expiry(self) -> float | None:
        with self._lock:
            return min((lease.expires_at for lease in self._leases.values()), default=None)

    def held(self) -> tuple[int, int]:
        """(held blocks, held bytes) on this rank."""
        with self._lock:
            return (
                sum(len(lease.block_ids) for lease in self._leases.values()),
                sum(lease.nbytes for lease in self._leases.values()),
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def __contains__(self, handle_id: str) -> bool:
        with self._lock:
            return handle_id in self._leases

    def _release(self, lease: Lease) -> None:
        self._changed()
        try:
            lease.on_release(lease.block_ids)
        except Exception:  # a failing engine callback must not kill the transport's threads
            log.exception("on_release failed for handle %s", lease.handle.handle_id)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(*self.held())
