"""Llama-family model configuration read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be served; the message says what to fix."""


class RopeScaling(BaseModel):
    """RoPE scaling parameters; ``rope_type`` selects the variant."""

    model_config = ConfigDict(extra="ignore")

    rope_type: Literal["default", "linear", "dynamic", "llama3"] = "default"
    factor: float = Field(1.0, gt=0, description="context extension factor")
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


class LlamaConfig(BaseModel):
    """The subset of a Llama/Mistral config.json the model needs."""

    model_config = ConfigDict(extra="ignore")

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(0, ge=0, description="0 means equal to num_attention_heads (MHA)")
    head_dim: int = Field(0, ge=0, description="0 means hidden_size // num_attention_heads")
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = Field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = Field("silu", description="MLP activation; kvrelay's SwiGLU implements silu only")
    sliding_window: int | None = Field(
        None, gt=0, description="Mistral: attend to the last N tokens only; None means full attention"
    )
    bos_token_id: int | None = None
    eos_token_id: list[int] = Field(default_factory=list)
    torch_dtype: str = "float32"

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        data = dict(raw)
        # transformers >= 4.45 may nest rope settings in `rope_parameters`; older files use rope_scaling.
        params = data.pop("rope_parameters", None) or {}
        scaling = data.get("rope_scaling") or {}
        scaling = {**params, **scaling}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if "rope_theta" in scaling and "rope_theta" not in data:
            data["rope_theta"] = scaling["rope_theta"]
        scaling.pop("rope_theta", None)
        data["rope_scaling"] = scaling
        eos = data.get("eos_token_id")
        data["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if data.get("dtype") and not data.get("torch_dtype"):
            data["torch_dtype"] = data["dtype"]
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> LlamaConfig:
        if self.num_key_value_heads == 0:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; kvrelay's MLP is SwiGLU (silu)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        return self


def parse_config(raw: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """Validate a config dict, raising ConfigError that names the file and the bad field."""
    archs = raw.get("architectures") or []
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{source}: architectures {archs} not supported; kvrelay serves {list(SUPPORTED_ARCHITECTURES)}"
        )
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_scaling type {rope_type!r} not supported; "
            f"use one of {list(SUPPORTED_ROPE_TYPES)}"
        )
    try:
        return LlamaConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{source}: invalid model config: {problems}") from exc


def served_length(config: LlamaConfig, max_model_len: int | None, source: str = "config.json") -> int:
    """The context length kvrelay serves (``max_model_len``, default ``max_position_embeddings``).

    kvrelay's attention is always full causal attention; it has no sliding-window mask. A model
    trained with ``sliding_window`` W computes the same thing as long as no sequence exceeds W
    tokens (a query at position i sees keys i-W+1..i, i.e. all of them), so a served length up to
    W is exact and a longer one would silently change the model's output past W tokens. That is
    refused here rather than capped: the router enforces its own limit (``--max-model-len``, else
    config.json's ``max_position_embeddings``) without loading the model, so a worker that quietly
    served fewer tokens would leave the router admitting prompts the workers then reject. A load
    error that names the flag makes the operator set one length that router and workers share.
    """
    max_len = max_model_len or config.max_position_embeddings
    window = config.sliding_window
    if window is not None and window < max_len:
        origin = "max_model_len" if max_model_len else "max_position_embeddings"
        raise ConfigError(
            f"{source}: sliding_window {window} is smaller than the served context length {max_len} "
            f"({origin}); kvrelay has no sliding-window attention, so past {window} tokens it would "
            f"attend to keys the model never saw; serve with --max-model-len {window} or less"
        )
    return max_len


def load_config(model_dir: str | Path) -> LlamaConfig:
    """Read and validate ``<model_dir>/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a Hugging Face checkpoint directory needs config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(raw, str(path))
