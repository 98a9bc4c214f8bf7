"""Llama-family decoder in torch and Hugging Face checkpoint loading."""

from kvrelay_worker.model.config import ConfigError, LlamaConfig, load_config, parse_config
from kvrelay_worker.model.llama import LlamaForCausalLM
from kvrelay_worker.model.loader import CheckpointError, load_model, save_checkpoint

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
