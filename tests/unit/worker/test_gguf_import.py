"""`kvrelay import-gguf` on small synthetic GGUF files written with the gguf package's own writer.

Every file here is built in the test: a 2-layer Llama (hidden 64, 4 heads, 2 KV heads, head_dim
16) with a byte-level BPE vocabulary (the 256 byte symbols, a few merges and ChatML control
tokens), Q/K rows permuted the way llama.cpp's converter stores them. The real-model check is
tests/e2e/test_smollm2_reference.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from kvrelay_worker.model import LlamaForCausalLM, gguf_import, load_model, parse_config
from kvrelay_worker.model.gguf_import import GGUFImportError, convert_gguf, unpermute_rotary_rows
from kvrelay_worker.tokenizer import Tokenizer as KvrelayTokenizer
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, CONTEXT = 64, 2, 4, 2, 16, 128, 256
EPS, ROPE_THETA = 1e-5, 100000.0
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "o r", "Ġ w", "Ġw or", "l d", "Ġwor ld", "1 2", "Ġ 1"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["hello world", "Hello, world! 12 123 4567", "  spaces\tand\nnewlines ", "héllo wörld ✓", ""]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def vocabulary() -> tuple[list[str], list[int]]:
    """(tokens, token types): 256 byte symbols, the merge results, then the control tokens (type 3)."""
    tokens = _bytes_to_unicode() + ["".join(m.split(" ")) for m in MERGES] + CONTROL
    types = [1] * (len(tokens) - len(CONTROL)) + [3] * len(CONTROL)
    return tokens, types


TOKENS, TOKEN_TYPES = vocabulary()
VOCAB = len(TOKENS)
BOS_ID, EOS_ID = TOKENS.index("<|im_start|>"), TOKENS.index("<|im_end|>")


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``permute`` for Q/K rows (written from its description)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights in Hugging Face names and shapes ([out, in])."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = mat(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = mat(HIDDEN, HEADS * HEAD_DIM)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = mat(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = mat(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = mat(HIDDEN, FFN)
    w["model.norm.weight"] = norm()
    if not tied:
        w["lm_head.weight"] = mat(VOCAB, HIDDEN)
    return w


# The test's own HF -> GGUF name table (independent of the importer's).
_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top:
        return top[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def metadata(arch: str = "llama") -> dict[str, Any]:
    return {
        f"{arch}.block_count": LAYERS,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.attention.layer_norm_rms_epsilon": EPS,
        f"{arch}.rope.freq_base": ROPE_THETA,
        f"{arch}.context_length": CONTEXT,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": TOKEN_TYPES,
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def write_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    arch: str = "llama",
    meta: dict[str, Any] | None = None,
    drop: Sequence[str] = (),
    raw_tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> Path:
    """A GGUF file like llama.cpp's converter writes: Q/K permuted, 2-D weights as ``qtype``, norms F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    fields = {**metadata(arch), **(meta or {})}
    for key, value in fields.items():
        if key in drop:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for hf, array in weights.items():
        if ".q_proj." in hf:
            array = llama_cpp_permute(array, HEADS)
        elif ".k_proj." in hf:
            array = llama_cpp_permute(array, KV_HEADS)
        if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(hf), np.ascontiguousarray(array, dtype=np.float32))
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name(hf), array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(hf), quantize(array, qtype), raw_dtype=qtype)
    for name, (data, raw_type) in (raw_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def untied() -> dict[str, np.ndarray]:
    return hf_weights(tied=False)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, untied: dict[str, np.ndarray]) -> Path:
    """The untied F32 model, imported once for the read-only checks."""
    root = tmp_path_factory.mktemp("gguf")
    return convert_gguf(write_gguf(root / "model.gguf", untied), root / "ckpt")


# --- weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permute(n_head: int) -> None:
    rng = np.random.default_rng(n_head)
    weight = rng.standard_normal((n_head * HEAD_DIM, 8)).astype(np.float32)
    bias = rng.standard_normal(n_head * HEAD_DIM).astype(np.float32)
    permuted = llama_cpp_permute(weight, n_head)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, n_head), weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(llama_cpp_permute(bias, n_head), n_head), bias)
    with pytest.raises(GGUFImportError, match="cannot be split into 3 rotary heads"):
        unpermute_rotary_rows(weight[:10], 3)


@pytest.mark.parametrize("type_name", gguf_import.TESTED_TYPES)
def test_round_trip_per_tensor_type(type_name: str, tmp_path: Path, untied: dict[str, np.ndarray]) -> None:
    qtype = GGMLQuantizationType[type_name]
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", untied, qtype), tmp_path / "ckpt")
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == untied.keys()
    for name, original in untied.items():
        array = got[name]
        assert array.dtype == np.float32 and array.shape == original.shape, name
        if original.ndim == 1 or qtype == GGMLQuantizationType.F32:
            np.testing.assert_array_equal(array, original, err_msg=name)
            continue
        # Quantization works along rows, so it commutes with the Q/K row permutation: the imported
        # (un-permuted) tensor is exactly what the gguf package's own round trip gives the original.
        expected = (
            original.astype(np.float16).astype(np.float32)
            if qtype == GGMLQuantizationType.F16
            else dequantize(quantize(original, qtype), qtype)
        )
        np.testing.assert_array_equal(array, expected, err_msg=name)
        # and that is within the type's rounding (half an ulp) / quantization error of the original
        rtol, atol = {
            "F16": (2**-11, 2**-25),
            "BF16": (2**-8, 0.0),
            "Q8_0": (0.0, np.abs(original).max() / 127),
            "Q4_1": (0.0, np.ptp(original) / 15),
        }[type_name]
        np.testing.assert_allclose(array, original, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_imported_f32_model_gives_the_same_logits(tied: bool, tmp_path: Path) -> None:
    weights = hf_weights(tied=tied, seed=1)
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", weights), tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in load_file(str(out / "model.safetensors"))) is not tied
    imported_model = load_model(out)

    # The same model built directly from the original (un-permuted) weights.
    config = parse_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "rms_norm_eps": EPS,
            "rope_theta": ROPE_THETA,
            "max_position_embeddings": CONTEXT,
            "tie_word_embeddings": tied,
        }
    )
    direct = LlamaForCausalLM(config)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    missing, unexpected = direct.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    direct.fuse_projections()
    if tied:
        direct.lm_head.weight = direct.model.embed_tokens.weight
    direct.eval()

    ids = torch.tensor([[BOS_ID, 5, 17, 99, 250, 3, 77, 260, 12, EOS_ID]])
    expected = direct.full_forward_logits(ids)
    assert torch.equal(imported_model.full_forward_logits(ids), expected)
    # and the permutation matters: a GGUF read without un-permuting gives other logits
    raw = {**weights}
    for i in range(LAYERS):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        raw[q] = llama_cpp_permute(raw[q], HEADS)
    wrong = LlamaForCausalLM(config)
    wrong.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in raw.items()}, strict=False)
    wrong.fuse_projections()
    assert not torch.allclose(wrong.eval().full_forward_logits(ids), expected)


# --- config and tokenizer --------------------------------------------------------------------


def test_config_files(imported: Path) -> None:
    text = (imported / "config.json").read_text()
    assert '"rms_norm_eps": 1e-05' in text  # float32 1e-5 written as its shortest decimal
    config = json.loads(text)
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    generation = json.loads((imported / "generation_config.json").read_text())
    assert generation == {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    tok_config = json.loads((imported / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["add_bos_token"] is False
    assert (imported / "IMPORTED_FROM").read_text() == "model.gguf\n"


def test_key_length_sets_head_dim_and_linear_rope_scaling(tmp_path: Path) -> None:
    meta = {
        "llama.attention.key_length": HEAD_DIM,
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 4.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "llama.rope.freq_base": 500000.0,
    }
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", hf_weights(True), meta=meta), tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == HEAD_DIM
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert config["rms_norm_eps"] == 1e-06 and config["rope_theta"] == 500000.0
    load_model(out)  # the loader accepts it


def reference_tokenizer(digits: bool) -> Tokenizer:
    """A `tokenizers` BPE built directly from the same vocabulary and merges."""
    vocab = {t: i for i, t in enumerate(TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(CONTROL)
    return tok


@pytest.mark.parametrize("pre", ["smollm", "gpt2"])
def test_tokenizer_matches_a_bpe_from_the_same_vocab(pre: str, tmp_path: Path) -> None:
    out = convert_gguf(
        write_gguf(tmp_path / "m.gguf", hf_weights(True), meta={"tokenizer.ggml.pre": pre}), tmp_path / "c"
    )
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = reference_tokenizer(digits=pre == "smollm")
    chat = "<|im_start|>user\nhello world 123<|im_end|>\n"
    for text in [*TEXTS, chat]:
        assert tok.encode(text).ids == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.get_vocab_size() == VOCAB
    assert tok.encode("hello world").tokens == ["hell", "o", "Ġworld"]
    # digits: one by one for smollm, the "1 2" merge applies for gpt2
    digits = tok.encode("x 123").tokens
    assert digits == (["x", "Ġ", "1", "2", "3"] if pre == "smollm" else ["x", "Ġ", "12", "3"])
    # control tokens are matched whole, and are special (skipped when decoding)
    ids = tok.encode(chat).ids
    assert ids[0] == BOS_ID and ids[-2] == EOS_ID and ids.count(BOS_ID) == 1
    assert tok.decode(ids) == "user\nhello world 123\n"


def test_kvrelay_tokenizer_reads_the_imported_directory(imported: Path) -> None:
    tok = KvrelayTokenizer.from_dir(imported)
    assert tok.eos_token_ids == [EOS_ID]
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[0] == BOS_ID and ids.count(EOS_ID) == 1
    assert tok.decode(ids) == "user\nhello\nassistant\n"


# --- errors ----------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path: Path, untied: dict[str, np.ndarray]) -> None:
    path = write_gguf(tmp_path / "m.gguf", untied, arch="gpt2")
    with pytest.raises(GGUFImportError, match=r"architecture 'gpt2' is not supported"):
        convert_gguf(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_type_the_gguf_package_cannot_dequantize(tmp_path: Path) -> None:
    weights = hf_weights(tied=True)
    up = "model.layers.1.mlp.up_proj.weight"
    rows, cols = weights.pop(up).shape
    block, size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
    raw = {
        "blk.1.ffn_up.weight": (np.zeros((rows, cols // block * size), np.uint8), GGMLQuantizationType.Q8_1)
    }
    path = write_gguf(tmp_path / "m.gguf", weights, raw_tensors=raw)
    with pytest.raises(
        GGUFImportError, match=r"tensor 'blk\.1\.ffn_up\.weight': type Q8_1 cannot be dequantized"
    ):
        convert_gguf(path, tmp_path / "ckpt")


def test_dequantize_not_implemented_names_tensor(
    tmp_path: Path, untied: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_gguf(tmp_path / "m.gguf", untied, GGMLQuantizationType.Q4_1)
    real = gguf.quants.dequantize

    def fake(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        if qtype == GGMLQuantizationType.Q4_1:
            raise NotImplementedError(qtype.name)
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", fake)
    with pytest.raises(GGUFImportError, match=r"tensor '[\w.]+': type Q4_1 cannot be dequantized"):
        convert_gguf(path, tmp_path / "ckpt")


def test_unknown_tensor_name(tmp_path: Path) -> None:
    extra = {"blk.0.attn_qkv.weight": (np.zeros((8, 64), np.float32), GGMLQuantizationType.F32)}
    path = write_gguf(tmp_path / "m.gguf", hf_weights(True), raw_tensors=extra)
    with pytest.raises(GGUFImportError, match=r"tensor 'blk\.0\.attn_qkv\.weight' has no Llama counterpart"):
        convert_gguf(path, tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("meta", "drop", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, (), r"tokenizer\.ggml\.model 'llama' is not supported"),
        ({"tokenizer.ggml.pre": "qwen2"}, (), r"tokenizer\.ggml\.pre 'qwen2' is not supported"),
        ({}, ("llama.context_length",), r"metadata key 'llama\.context_length' is missing"),
        ({}, ("tokenizer.ggml.tokens",), r"metadata key 'tokenizer\.ggml\.tokens' is missing"),
        ({"llama.rope.scaling.type": "yarn"}, (), r"rope\.scaling\.type 'yarn' is not supported"),
        ({"tokenizer.ggml.add_bos_token": True}, (), r"add_bos_token = true is not supported"),
    ],
)
def test_metadata_errors(meta: dict[str, Any], drop: Sequence[str], message: str, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", hf_weights(True), meta=meta, drop=drop)
    with pytest.raises(GGUFImportError, match=message):
        convert_gguf(path, tmp_path / "ckpt")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("bytes") / "m.gguf", hf_weights(tied=True)).read_bytes()


@pytest.mark.parametrize(
    "cut",
    [
        b"",
        b"not a gguf file at all",
        b"GGUF\x03\x00\x00\x00\xff\xff",
        4,  # truncated downloads: in the header, the key/values, the tensor infos, the tensor data
        24,
        2000,
        6000,
        -100,
    ],
)
def test_not_a_gguf_file(cut: bytes | int, gguf_bytes: bytes, tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(cut if isinstance(cut, bytes) else gguf_bytes[:cut])
    with pytest.raises(GGUFImportError, match=r"x\.gguf: not a readable GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "ckpt")
    with pytest.raises(GGUFImportError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_non_empty_output_directory(tmp_path: Path, untied: dict[str, np.ndarray]) -> None:
    path = write_gguf(tmp_path / "m.gguf", untied)
    out = tmp_path / "ckpt"
    out.mkdir()
    convert_gguf(path, out)  # an existing empty directory is fine
    (out / "stale.txt").write_text("old")
    with pytest.raises(GGUFImportError, match=r"ckpt: exists and is not empty"):
        convert_gguf(path, out)
    assert (out / "stale.txt").exists()
    convert_gguf(path, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]  # no staging left behind


# --- CLI -------------------------------------------------------------------------------------


def test_cli(tmp_path: Path, untied: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]) -> None:
    from kvrelay_worker.cli import main

    path = write_gguf(tmp_path / "m.gguf", untied)
    with pytest.raises(SystemExit) as exit_info:
        main(["import-gguf", str(path), str(tmp_path / "ckpt")])
    assert exit_info.value.code == 0
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert str(tmp_path / "ckpt") in capsys.readouterr().out

    (tmp_path / "bad.gguf").write_bytes(b"definitely not gguf")
    with pytest.raises(SystemExit) as exit_info:
        main(["import-gguf", str(tmp_path / "bad.gguf"), str(tmp_path / "other")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "bad.gguf" in err
    assert not (tmp_path / "other").exists()


def test_import_is_torch_free(tmp_path: Path, untied: dict[str, np.ndarray]) -> None:
    path = write_gguf(tmp_path / "m.gguf", untied)
    code = (
        "import sys\n"
        "from kvrelay_worker.model.gguf_import import convert_gguf\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "convert_gguf(sys.argv[1], sys.argv[2])\n"
        "assert 'torch' not in sys.modules, 'convert'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "ckpt")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ckpt" / "config.json").is_file()
