"""Write a small random Llama-shaped checkpoint (fixed seed) with an offline-trained tokenizer.

Console script: ``kvrelay-make-tiny-model OUTDIR [--size tiny|100m|1b]``. Tests and the local
demo use it; the weights are random, so outputs are gibberish but deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from kvrelay_worker.model.config import parse_config
from kvrelay_worker.model.llama import LlamaForCausalLM
from kvrelay_worker.model.loader import save_checkpoint

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Shapes: tiny for tests, ~100M and ~1B parameters for benchmarks (vocab from the tokenizer).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}

_CORPUS = """\
The relay carries the memory of a prompt from one machine to another. A prefill worker reads the
whole prompt at once, computes its keys and values, and hands them over; a decode worker takes the
cache and writes one token at a time, many requests side by side. Clouds drift over the harbour
while the ferries cross, the lighthouse blinks twice, and the fishermen count their nets. Numbers
such as 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 appear in logs, in tables, and in questions: what is the
time, where is the station, how many blocks are free? Quick brown foxes jump over lazy dogs; seven
wizards box with jumpy frogs. def main(): return {"role": "user", "content": "hello world"}
Rivers run to the sea, trains leave on time, and the scheduler admits a new sequence every step.
"""


def build_tokenizer(vocab_size: int = 512) -> Any:
    """Train a byte-level BPE on the built-in text; the same input gives the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line] * 4
    tok.train_from_iterator(lines, trainer)
    return tok


def make_config(size: str, vocab_size: int, special_ids: dict[str, int], tie: bool, dtype: str) -> dict:
    shape = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        **shape,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        # Llama 3.x style scaling so the served tiny model exercises that code path.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        "max_position_embeddings": 2048 if size == "tiny" else 4096,
        "tie_word_embeddings": tie,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": special_ids[BOS],
        "eos_token_id": [special_ids[EOS], special_ids[EOT]],
        "torch_dtype": dtype,
    }


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, special_token_ids: list[int], seed: int) -> None:
    """Deterministic init with well-separated logits; special tokens get zero LM-head rows so greedy
    decoding never emits EOS and tests see multi-token outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=gen))
        elif param.dim() == 2:
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
        else:
            param.zero_()
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.mul_(3.0)  # sharper logits: fewer near-ties between top tokens
        model.lm_head.weight[special_token_ids] = 0.0


def make_tiny_model(
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json, safetensors, tokenizer files and generation_config.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    raw = make_config(size, tok.get_vocab_size(), special_ids, tie_word_embeddings, dtype)
    config = parse_config(raw)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):  # skip torch's default init: init_weights writes every parameter
        model = LlamaForCausalLM(config, max_model_len=64)
    model.to_empty(device="cpu")
    if tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    init_weights(model, list(special_ids.values()), seed)
    model.to(torch_dtype)
    save_checkpoint(model, out, max_shard_bytes=max_shard_bytes)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "bos_token": BOS,
        "eos_token": EOT,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": raw["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    gen_config = {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a random Llama-shaped checkpoint for tests and demos."
    )
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument(
        "--max-shard-mb", type=float, default=0, help="split into shards of this size (0: one file)"
    )
    args = parser.parse_args(argv)
    shard = int(args.max_shard_mb * 2**20) or None
    path = make_tiny_model(args.out_dir, args.size, args.seed, args.tie_word_embeddings, args.dtype, shard)
    print(f"wrote {args.size} checkpoint to {path}")


if __name__ == "__main__":
    main()
