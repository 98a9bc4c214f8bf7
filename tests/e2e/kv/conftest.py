"""Fixtures for KV relay process tests: long-lived shared peers and per-test peers (always stopped)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kv_testlib import PeerProcess, make_peer, shutdown_peers


@pytest.fixture(scope="session")
def pool() -> Iterator[Any]:
    """pool(flavour, tp_size=, tp_rank=, seed=) -> a long-lived peer shared by tests (never kill it).

    Process start-up (torch, NIXL) dominates these tests, so well-behaved peers are reused.
    """
    peers: dict[tuple, PeerProcess] = {}

    def _get(flavour: str, *, tp_size: int = 1, tp_rank: int = 0, seed: int | None = None) -> PeerProcess:
        key = (flavour, tp_size, tp_rank, seed)
        if key not in peers:
            peers[key] = make_peer(flavour, tp_size, tp_rank, 64, {"seed": seed})
        return peers[key]

    yield _get
    shutdown_peers(list(peers.values()))


@pytest.fixture
def spawn() -> Iterator[Any]:
    """spawn(flavour, tp_size=, tp_rank=, num_blocks=, seed=, lease_s=, layout=) -> a per-test peer."""
    peers: list[PeerProcess] = []

    def _spawn(flavour: str, *, tp_size: int = 1, tp_rank: int = 0, num_blocks: int = 64, **extra: Any):
        peer = make_peer(flavour, tp_size, tp_rank, num_blocks, extra)
        peers.append(peer)
        return peer

    yield _spawn
    shutdown_peers(peers)
