"""KV relay: move a prompt's KV cache blocks from a prefill (holder) rank into a decode (reader) rank."""

from __future__ import annotations

from typing import Any

import torch

from .base import KVTransport
from .handle import (
    KVHandle,
    KVHolderRank,
    KVLayout,
    KVLayoutMismatch,
    KVTransferError,
    check_compatible,
    merge_rank_handles,
)
from .metrics import KVMetrics

__all__ = [
    "KVHandle",
    "KVHolderRank",
    "KVLayout",
    "KVLayoutMismatch",
    "KVMetrics",
    "KVTransferError",
    "KVTransport",
    "check_compatible",
    "create_transport",
    "merge_rank_handles",
]


def create_transport(
    backend: str, kv_cache: torch.Tensor, layout: KVLayout, tp_rank: int = 0, **kwargs: Any
) -> KVTransport:
    """Build (not start) the transport for `backend` ("nixl" or "tcp") over the engine's kv_cache tensor.

    kwargs: host, port, advertise_host, secret, lease_s, metrics (KVMetrics), clock; nixl also
    takes backend_params (UCX backend parameters).
    """
    if backend == "tcp":
        from .tcp import TcpTransport

        return TcpTransport(kv_cache, layout, tp_rank, **kwargs)
    if backend == "nixl":
        from .nixl import NixlTransport

        return NixlTransport(kv_cache, layout, tp_rank, **kwargs)
    raise ValueError(f"unknown KV backend {backend!r}; use 'nixl' or 'tcp'")
