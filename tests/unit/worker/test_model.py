"""Checkpoint round trip, sharding, tied embeddings, clear errors, rope scaling, tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kvrelay_worker.model import CheckpointError, ConfigError, load_config, load_model, save_checkpoint
from kvrelay_worker.model.config import parse_config
from kvrelay_worker.model.rope import rope_inv_freq
from kvrelay_worker.model.tiny import build_tokenizer, make_tiny_model
from safetensors.torch import load_file, save_file

IDS = torch.tensor([[5, 17, 99, 250, 3, 77, 400, 12]])


def test_tiny_checkpoint_round_trip_identical_logits(tiny_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_dir)
    save_checkpoint(model, tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    again = load_model(tmp_path)
    assert torch.equal(model.full_forward_logits(IDS), again.full_forward_logits(IDS))
    # and the script is deterministic: same seed, same bytes of weights
    second = make_tiny_model(tmp_path / "second")
    a, b = load_file(str(tiny_dir / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_loads(tiny_dir: Path, tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (out / "model.safetensors").exists()
    sharded, single = load_model(out), load_model(tiny_dir)
    assert torch.equal(sharded.full_forward_logits(IDS), single.full_forward_logits(IDS))


def test_tied_embeddings(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    model = load_model(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.isfinite(model.full_forward_logits(IDS)).all()


def test_missing_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_dir / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_shape_mismatch_and_bad_config(tiny_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight: shape \(192, 64\) in checkpoint"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="must be a multiple of num_key_value_heads 3"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    bad = {k: v for k, v in raw.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="hidden_size"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="architectures"):
        parse_config({**raw, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="'yarn' not supported"):
        parse_config({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nowhere")


def _cfg(**scaling):
    base = dict(
        vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    )
    return parse_config(
        {**base, "rope_theta": 10000.0, "max_position_embeddings": 1024, "rope_scaling": scaling}
    )


def test_rope_scaling_variants() -> None:
    plain = rope_inv_freq(_cfg(), 1024)
    assert torch.allclose(rope_inv_freq(_cfg(type="linear", factor=4.0), 1024), plain / 4)
    # dynamic NTK: unchanged within the native length, a larger base beyond it
    assert torch.equal(rope_inv_freq(_cfg(rope_type="dynamic", factor=2.0), 1024), plain)
    longer = rope_inv_freq(_cfg(rope_type="dynamic", factor=2.0), 4096)
    assert longer[0] == plain[0] and (longer[1:] < plain[1:]).all()
    l3 = rope_inv_freq(
        _cfg(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
        1024,
    )
    wavelen = 2 * torch.pi / plain
    assert torch.equal(l3[wavelen < 64], plain[wavelen < 64])  # high frequencies kept
    assert torch.allclose(l3[wavelen > 256], plain[wavelen > 256] / 8)  # low frequencies scaled
    # newer transformers nest theta and type in rope_parameters
    nested = parse_config(
        {
            **_cfg().model_dump(exclude={"rope_theta"}),
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        }
    )
    assert nested.rope_theta == 500.0 and nested.rope_scaling.rope_type == "linear"


def test_tiny_tokenizer_is_deterministic_and_complete(tiny_dir: Path) -> None:
    a, b = build_tokenizer(), build_tokenizer()
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 512
    text = "The scheduler admits a new sequence, 42 times!"
    assert a.decode(a.encode(text).ids) == text
    tok_cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|eot_id|>" and "{{ bos_token }}" in tok_cfg["chat_template"]


def test_an_activation_other_than_silu_is_refused(tmp_path: Path) -> None:
    """kvrelay's MLP is SwiGLU: a gelu checkpoint must not load and silently compute silu."""
    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "hidden_act": "gelu"})
    )  # fmt: skip
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        load_config(tmp_path)
