"""Load and save Hugging Face checkpoint directories (config.json + *.safetensors, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvrelay_worker.model.config import ConfigError, LlamaConfig, load_config, served_length
from kvrelay_worker.model.llama import LlamaForCausalLM
from kvrelay_worker.model.parallel import SINGLE, TensorParallel, shard_dim, shard_range
from kvrelay_worker.model.rope import RotaryEmbedding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Keys some exporters write that carry no weights we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config; the message lists what is wrong."""


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast bf16 kernels there); bf16 on CUDA when supported, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def checkpoint_files(model_dir: Path) -> dict[str, list[str]]:
    """Map each safetensors file in ``model_dir`` to the tensor names it should hold."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (and no {INDEX_FILE})")
    files = {}
    for fname in found:
        with safe_open(str(model_dir / fname), framework="pt") as f:
            files[fname] = list(f.keys())
    return files


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_model_len: int | None = None,
    tp: TensorParallel = SINGLE,
) -> LlamaForCausalLM:
    """Build the model from ``config.json`` and load every tensor (this rank's shard of the split ones);
    refuse missing or extra tensors."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    config = load_config(model_dir)
    dtype = dtype or default_dtype(device)
    max_len = served_length(config, max_model_len, str(model_dir / "config.json"))
    with torch.device("meta"):
        whole = LlamaForCausalLM(config, max_len)  # the checkpoint's shapes, to check them against
        model = LlamaForCausalLM(config, max_len, tp) if tp.size > 1 else whole
    expected = {k: v for k, v in whole.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    state: dict[str, torch.Tensor] = {}
    for fname, names in checkpoint_files(model_dir).items():
        path = model_dir / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            present = set(f.keys())
            for name in names:
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in present:
                    raise CheckpointError(f"{path}: tensor {name!r} listed in {INDEX_FILE} but not in file")
                state[name] = _read(f, name, tp, expected.get(name))
    _check_tensors(model_dir, expected, state, config, tp)

    for name, tensor in state.items():
        state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.fuse_projections()  # assign=True replaced the projections' views of the fused weights
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary_emb = RotaryEmbedding(config, max_len).to(device)
    return model.eval()


def _read(f: Any, name: str, tp: TensorParallel, whole: torch.Tensor | None) -> torch.Tensor:
    """The tensor, or only this rank's shard of it (read as a slice: a rank never reads the rest).

    A tensor whose shape does not match the config is read whole, for ``_check_tensors`` to report.
    """
    dim = shard_dim(name)
    if tp.size == 1 or dim is None or whole is None:
        return f.get_tensor(name)
    piece = f.get_slice(name)
    shape = tuple(piece.get_shape())
    if shape != tuple(whole.shape):
        return f.get_tensor(name)
    start, end = shard_range(shape[dim], tp)
    return piece[start:end] if dim == 0 else piece[:, start:end]


def _check_tensors(
    model_dir: Path,
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    config: LlamaConfig,
    tp: TensorParallel = SINGLE,
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    for name in sorted(set(expected) & set(state)):
        want = list(expected[name].shape)
        dim = shard_dim(name)
        if tp.size > 1 and dim is not None:  # a shard was read: compare it with its share of the whole
            want[dim] //= tp.size
        if tuple(want) != tuple(state[name].shape):
            problems.append(
                f"{name}: shape {tuple(state[name].shape)} in checkpoint, {tuple(expected[name].shape)} "
                "from config.json"
            )
    if problems:
        raise CheckpointError(
            f"{model_dir}: checkpoint does not match config.json "
            f"({config.num_hidden_layers} layers, hidden {config.hidden_size}): " + "; ".join(problems)
        )


def _short(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def save_checkpoint(
    model: LlamaForCausalLM, out_dir: str | Path, max_shard_bytes: int | None = None
) -> list[Path]:
    """Write config-matching safetensors (one file, or shards + index when over ``max_shard_bytes``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = out_dir / SINGLE_FILE
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        paths.append(out_dir / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return paths


__all__ = ["CheckpointError", "ConfigError", "default_dtype", "load_model", "save_checkpoint"]
