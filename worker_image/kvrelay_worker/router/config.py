"""Router configuration (pydantic): what to serve and where the workers are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

FALLBACK_MAX_MODEL_LEN = 2048


def model_max_len(model_dir: Path) -> int:
    """The checkpoint's context length from `config.json` (`max_position_embeddings`)."""
    path = Path(model_dir) / "config.json"
    if path.exists():
        value = json.loads(path.read_text()).get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_MAX_MODEL_LEN


class RouterConfig(BaseModel):
    model_dir: Path = Field(
        description="checkpoint directory; the router reads only tokenizer and config files"
    )
    served_model_name: str = Field(min_length=1, description="the `model` clients must send")
    max_model_len: int = Field(gt=0, description="prompt + completion limit in tokens")
    discovery: Literal["static", "kubernetes"] = "static"
    prefill: list[str] = Field(default_factory=list, description="static prefill worker gRPC host:port")
    decode: list[str] = Field(default_factory=list, description="static decode worker gRPC host:port")
    namespace: str | None = Field(default=None, description="kubernetes discovery: namespace (default: own)")
    instance: str | None = Field(default=None, description="kubernetes discovery: DisaggregatedModel name")
    grpc_port_name: str = Field(default="grpc", description="EndpointSlice port name of the workers' gRPC")
    api_key: SecretStr | None = Field(
        default=None, description="when set, clients must send it as a Bearer token"
    )
    health_interval_s: float = Field(default=1.0, gt=0)
    decode_idle_timeout_s: float = Field(
        default=120.0, gt=0, description="resume a request whose decode worker sends nothing for this long"
    )
    max_migrations: int = Field(
        default=3, ge=0, description="times one request may resume on another decode worker before it fails"
    )
    prefix_weight: float = Field(
        default=1.0,
        ge=0,
        description="prefill routing: queued tokens one likely-cached prompt token is worth (0: off)",
    )
    decode_prefix_weight: float = Field(
        default=2.0,
        ge=0,
        description="decode routing: running streams a worker holding the whole input is worth (0: off)",
    )
    kv_block_size: int = Field(default=16, ge=1, description="the workers' KV block size (prefix hashes)")
    prefix_index_blocks: int = Field(
        default=1024, ge=1, description="blocks remembered per worker and role (about its KV cache size)"
    )
    max_waiting_requests: int = Field(
        default=256,
        ge=0,
        description="requests held at once while a role they need has no ready worker; more get a 503",
    )
    max_wait_s: float = Field(
        default=60.0,
        ge=0,
        description="how long a request is held for a ready worker of every role it needs before a 503 "
        "no_ready_replicas (0: no holding, a 503 at once)",
    )
    resume_via: Literal["prefill", "decode"] = Field(
        default="prefill",
        description="who recomputes a resumed request's KV: a prefill worker (relayed) or the decode worker",
    )
