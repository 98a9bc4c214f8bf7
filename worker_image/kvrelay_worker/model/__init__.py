"""Llama-family decoder in torch, Hugging Face checkpoint loading, and the GGUF importer.

Names are resolved lazily so that the torch-free parts (``config``, ``gguf_import``) import
without torch (``kvrelay serve`` converts a GGUF file in the router's process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointError": "loader",
    "ConfigError": "config",
    "LlamaConfig": "config",
    "LlamaForCausalLM": "llama",
    "load_config": "config",
    "load_model": "loader",
    "parse_config": "config",
    "save_checkpoint": "loader",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "load_config",
    "load_model",
    "parse_config",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from kvrelay_worker.model.config import ConfigError, LlamaConfig, load_config, parse_config
    from kvrelay_worker.model.llama import LlamaForCausalLM
    from kvrelay_worker.model.loader import CheckpointError, load_model, save_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
