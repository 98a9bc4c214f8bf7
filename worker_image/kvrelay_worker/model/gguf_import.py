"""Import a llama.cpp GGUF file into the Hugging Face checkpoint layout the loader reads.

One loader serves every checkpoint: a GGUF file is converted once into ``config.json`` +
``model.safetensors`` + ``tokenizer.json`` (+ ``tokenizer_config.json`` with its chat template and
``generation_config.json``), and from then on it is an ordinary checkpoint directory.

Torch-free on purpose (numpy, ``gguf``, ``safetensors.numpy``, ``tokenizers``): ``kvrelay serve``
and an image's init container run it without loading torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata key prefix per architecture we can serve, and the HF architecture it becomes.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
# Types `kvrelay import-gguf` is tested on; others the gguf package can dequantize work too.
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_1")
# GGUF token types (llama.cpp's llama_token_type): 3 control, 4 user-defined.
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class GGUFImportError(ValueError):
    """The GGUF file cannot become a servable checkpoint; the message names the field or tensor."""


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise GGUFImportError(f"tensor {gguf_name!r}: unexpected name (no .weight/.bias suffix)")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise GGUFImportError(f"tensor {gguf_name!r} has no Llama counterpart; kvrelay cannot serve it")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order so rotary pairs are (i, i + head_dim/2) again, as in HF.

    llama.cpp rotates adjacent pairs (2i, 2i+1) and its converter reorders each head's rows to
    match; Hugging Face's rotate-half pairs row i with row i + head_dim/2. Per head the GGUF rows
    are [r0, r_half, r1, r_half+1, ...]; splitting them into (head_dim/2, 2) and swapping the two
    axes gives back [r0, r1, ..., r_half, r_half+1, ...]. Works for weights [rows, in] and biases.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise GGUFImportError(f"{rows} rows cannot be split into {num_heads} rotary heads")
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class _Metadata:
    """Typed access to a GGUF file's key/value fields."""

    def __init__(self, reader: Any, source: str) -> None:
        self._fields = reader.fields
        self._source = source

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFImportError(f"{self._source}: metadata key {key!r} is missing")
        return value


def _config(meta: _Metadata, arch: str, vocab_size: int, tied: bool) -> dict[str, Any]:
    """config.json in Hugging Face's Llama layout from the GGUF's ``<arch>.*`` keys."""
    p = f"{arch}."
    heads = int(meta.require(p + "attention.head_count"))
    hidden = int(meta.require(p + "embedding_length"))
    config: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(p + "feed_forward_length")),
        "num_hidden_layers": int(meta.require(p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": int(meta.get(p + "attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(meta.require(p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.require(p + "context_length")),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFImportError(f"{p}rope.scaling.type {scaling!r} is not supported (only linear)")
        factor = _f32(meta.require(p + "rope.scaling.factor"))
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    for name in ("bos_token_id", "eos_token_id"):
        if meta.get(f"tokenizer.ggml.{name}") is not None:
            config[name] = int(meta.get(f"tokenizer.ggml.{name}"))
    return config


def _f32(value: float) -> float:
    """GGUF stores floats as float32: write the shortest decimal that reads back as the same float32
    (1e-05, not 9.999999747378752e-06), as the original config.json had it."""
    return float(str(np.float32(value)))


def build_tokenizer_json(meta: _Metadata) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json) from a GGUF's byte-level BPE vocabulary.

    Only ``tokenizer.ggml.model == gpt2`` (byte-level BPE, as SmolLM2, Llama 3 and Qwen use) is
    supported; SentencePiece vocabularies are refused by name.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"tokenizer.ggml.model {kind!r} is not supported (only gpt2 byte-level BPE)")
    tokens: list[str] = list(meta.require("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "(missing)"), pre_tokenizers)
    tok.decoder = decoders.ByteLevel()
    # Control and user-defined tokens are matched whole before BPE (llama.cpp does the same).
    added = [
        AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(added)
    if meta.get("tokenizer.ggml.add_bos_token"):
        raise GGUFImportError("tokenizer.ggml.add_bos_token = true is not supported yet")

    def token(key: str) -> str | None:
        idx = meta.get(key)
        return tokens[int(idx)] if idx is not None else None

    tok_config: dict[str, Any] = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": False,
        "model_max_length": None,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    return tok.to_str(), {k: v for k, v in tok_config.items() if v is not None}


def _pre_tokenizer(pre: str, pre_tokenizers: Any) -> Any:
    """The pre-tokenizer llama.cpp's ``tokenizer.ggml.pre`` names (GPT-2 regex, digits split for some)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # These split every digit on its own before the GPT-2 regex (llama.cpp: "\p{N}" first).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "gpt-2"):
        return byte_level
    # "default" (or no key) means llama.cpp's converter did not recognise the tokenizer and falls
    # back to regexes of its own; guessing here would tokenize differently without saying so.
    raise GGUFImportError(
        f"tokenizer.ggml.pre {pre!r} is not supported (known: smollm, starcoder, refact, gpt2)"
    )


def _dequantize(tensor: Any) -> np.ndarray:
    """The tensor as fp32 in Hugging Face's shape (GGUF lists dimensions fastest-first)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        flat = dequantize(tensor.data, qtype)
    except NotImplementedError as exc:
        raise GGUFImportError(
            f"tensor {tensor.name!r}: type {qtype.name} cannot be dequantized "
            f"(tested: {', '.join(TESTED_TYPES)})"
        ) from exc
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(shape)


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint directory for ``gguf_path`` at ``out_dir`` (atomically); return ``out_dir``.

    A non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise GGUFImportError(f"{out_dir}: exists and is not empty")
    if not gguf_path.is_file():
        raise GGUFImportError(f"{gguf_path}: no such file")
    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError, IndexError) as exc:  # IndexError: the reader on a truncated file
        raise GGUFImportError(f"{gguf_path}: not a readable GGUF file ({exc})") from exc
    meta = _Metadata(reader, str(gguf_path))
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{gguf_path}: architecture {arch!r} is not supported "
            f"(kvrelay serves {sorted(SUPPORTED_ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFImportError(
            f"{gguf_path}: per-frequency RoPE factors (rope_freqs.weight) are not supported"
        )
    tokenizer_json, tok_config = build_tokenizer_json(meta)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFImportError(f"{gguf_path}: tensor 'token_embd.weight' is missing")
    config = _config(meta, arch, int(embd.shape[1]), tied="output.weight" not in names)
    if any(n.startswith("blk.") and n.endswith(".bias") for n in names):
        config["attention_bias"] = any(
            n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in names
        )
        config["mlp_bias"] = any(n.endswith(("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")) for n in names)
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        array = _dequantize(tensor)
        if ".q_proj." in name:
            array = unpermute_rotary_rows(array, num_heads)
        elif ".k_proj." in name:
            array = unpermute_rotary_rows(array, num_kv_heads)
        state[name] = array
    if log:
        log(f"dequantized {len(state)} tensors from {gguf_path.name}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "tokenizer.json").write_text(tokenizer_json)
        (staging / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (staging / "IMPORTED_FROM").write_text(f"{gguf_path.name}\n")
        for path in (staging, *staging.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``kvrelay import-gguf FILE OUT_DIR``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="kvrelay import-gguf",
        description="Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory kvrelay serves.",
    )
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("out_dir", help="checkpoint directory to write (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        convert_gguf(args.gguf, args.out_dir, lambda m: print(m, file=sys.stderr), args.overwrite)
    except GGUFImportError as exc:
        print(f"kvrelay import-gguf: error: {exc}", file=sys.stderr)
        return 2
    print(args.out_dir)
    return 0
