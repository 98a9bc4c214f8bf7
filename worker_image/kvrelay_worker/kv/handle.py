"""KV handle and layout (wire contract section 2): pydantic models, HMAC signing, compatibility."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Backend = Literal["nixl", "tcp"]
DType = Literal["float16", "bfloat16", "float32"]

DTYPE_ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}


class KVTransferError(RuntimeError):
    """A KV fetch failed; `reason` is the `kvrelay_kv_transfer_failures_total` label."""

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}" if message else reason)


class KVLayoutMismatch(KVTransferError):
    """Holder and reader KV layouts cannot be relayed; the message names both sides."""

    def __init__(self, message: str) -> None:
        super().__init__("layout_mismatch", message)


class KVLayout(BaseModel):
    """Per-model KV cache layout; `tp_size` is the tensor-parallel degree of the side it describes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str = Field(description="Served model identity (name@revision); must match on both sides.")
    num_layers: int = Field(gt=0)
    block_size: int = Field(gt=0, description="Tokens per KV block.")
    num_kv_heads: int = Field(gt=0, description="Global number of KV heads (before TP split).")
    head_dim: int = Field(gt=0)
    dtype: DType
    tp_size: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> KVLayout:
        if self.num_kv_heads % self.tp_size:
            raise ValueError(
                f"num_kv_heads {self.num_kv_heads} is not divisible by tp_size {self.tp_size}; "
                "choose a TP degree that divides the KV head count"
            )
        return self

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def num_kv_heads_local(self) -> int:
        return self.num_kv_heads // self.tp_size

    def block_bytes_local(self) -> int:
        """Bytes one block occupies on one rank across all layers, K and V."""
        return self.num_layers * 2 * self.num_kv_heads_local * self.block_size * self.head_dim * self.itemsize


class KVHolderRank(BaseModel):
    """One holder TP rank: who holds the blocks, how to reach it, and where they live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(ge=0)
    agent_name: str = Field(description="NIXL agent name (tcp backend: a unique holder id).")
    endpoint: str = Field(description="host:port of the holder rank's control (and tcp data) endpoint.")
    block_ids: list[int] = Field(description="Holder block ids of the sequence, in token order.")
    num_blocks_total: int = Field(gt=0, description="Dimension 2 of the holder's kv_cache tensor.")
    base_addr: int = Field(default=0, ge=0, description="NIXL: address of the registered kv_cache tensor.")
    mem_type: Literal["DRAM", "VRAM"] = "DRAM"
    device_id: int = Field(default=0, ge=0)


class KVHandle(BaseModel):
    """A signed, leased claim on KV blocks held by a prefill worker (JSON on the wire)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    handle_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    request_id: str
    backend: Backend
    holder: KVHolderRank = Field(description="Rank 0 of the holder (the control endpoint to talk to).")
    layout: KVLayout
    ranks: list[KVHolderRank] = Field(min_length=1, description="One entry per holder TP rank, by rank.")
    num_tokens: int = Field(gt=0)
    lease_expires_at: float = Field(description="Unix seconds (wall clock).")
    signature: str = ""

    def payload_bytes(self) -> bytes:
        """Canonical JSON of every field but the signature (what the HMAC covers)."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, secret: bytes) -> KVHandle:
        return self.model_copy(update={"signature": sign_payload(self.payload_bytes(), secret)})

    def verify(self, secret: bytes) -> bool:
        return hmac.compare_digest(self.signature, sign_payload(self.payload_bytes(), secret))

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> KVHandle:
        return cls.model_validate_json(data)

    def rank(self, rank: int) -> KVHolderRank:
        for entry in self.ranks:
            if entry.rank == rank:
                return entry
        raise KVTransferError("bad_handle", f"handle {self.handle_id} has no holder rank {rank}")


def sign_payload(payload: bytes, secret: bytes) -> str:
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def merge_rank_handles(parts: list[KVHandle], secret: bytes) -> KVHandle:
    """Combine the per-rank handles of one request (holder TP > 1) into one signed handle."""
    if not parts:
        raise ValueError("no handles to merge")
    first = parts[0]
    ids = {(p.handle_id, p.request_id, p.layout, p.num_tokens, p.backend) for p in parts}
    if len(ids) != 1:
        raise ValueError("handles to merge disagree on handle id, request, layout, tokens or backend")
    ranks = sorted((r for p in parts for r in p.ranks), key=lambda r: r.rank)
    if [r.rank for r in ranks] != list(range(first.layout.tp_size)):
        raise ValueError(f"need exactly ranks 0..{first.layout.tp_size - 1}, got {[r.rank for r in ranks]}")
    merged = first.model_copy(
        update={
            "handle_id": first.handle_id,
            "holder": ranks[0],
            "ranks": ranks,
            "lease_expires_at": min(p.lease_expires_at for p in parts),
        }
    )
    return merged.signed(secret)


def check_compatible(holder: KVLayout, reader: KVLayout) -> None:
    """Raise KVLayoutMismatch, naming both sides, unless `reader` can read `holder`'s blocks.

    Any two TP degrees that divide the KV heads pair (each layout checks its own): a reader rank reads
    its heads from every holder rank that has some of them (`runs.source_slices`)."""
    problems = [
        f"{name} {getattr(holder, name)} (holder) != {getattr(reader, name)} (reader)"
        for name in ("model_id", "num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
        if getattr(holder, name) != getattr(reader, name)
    ]
    if problems:
        raise KVLayoutMismatch("; ".join(problems))
