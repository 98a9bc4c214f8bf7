"""kvrelay's Llama-family decoder against Hugging Face transformers, an independent implementation.

Every case builds a random-weight checkpoint with transformers' own config and model classes,
writes it with ``save_pretrained`` and loads that directory with kvrelay's ``load_model``; both
then compute fp32 logits for the same token ids. transformers is a dev dependency only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from kvrelay_worker.model import ConfigError, LlamaForCausalLM, load_model

# Largest |kvrelay - transformers| over all logits, divided by the largest |transformers logit|
# (~0.7 here). Measured on CPU, fp32, 1 thread, torch 2.15, transformers 5.23: 5.7e-7 to 1.1e-6
# over these cases (~10 fp32 ulps of the largest logit), at most 1.24e-6 over 6 seeds. 5e-6 is
# 4x that. Mutations miss it by orders of magnitude: the rope rotation's sign flipped 0.9-1.25
# (every case), RMSNorm without eps 3.5e-2 to 6.3e-2 (every case), llama3 with unscaled
# inv_freq 1.1 (the llama3 case).
REL_TOL = 5e-6
BATCH = 2
SEED = 1234

# Tens of milliseconds a case on one core; head_dim 16 unless a case says otherwise.
BASE: dict[str, Any] = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Case:
    id: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 40
    arch: str = "llama"
    max_model_len: int | None = None  # None: kvrelay's default, max_position_embeddings


CASES = [
    Case("gqa1-mha", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    Case("gqa3", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2}),
    Case("gqa8", {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 1}),
    Case("tied-embeddings", {"tie_word_embeddings": True}),
    Case("untied-embeddings", {"tie_word_embeddings": False}),
    # 4 heads of 32 on a 64-wide residual: q_proj is 64 -> 128, o_proj 128 -> 64
    Case("head_dim32-ne-hidden64/heads4", {"head_dim": 32}),
    # Original context 32, extended 4x to 128; 96 tokens run well past the original 32. head_dim 32
    # spreads the wavelengths (6 .. 35000 positions) over all three llama3 bands (< 8, 8-32, > 32).
    Case(
        "rope-llama3-past-original-ctx",
        {
            "head_dim": 32,
            "max_position_embeddings": 128,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        seq_len=96,
    ),
    # Linear (position interpolation): trained on 32, max_position_embeddings the extended 4 x 32.
    Case(
        "rope-linear-past-original-ctx",
        {
            "max_position_embeddings": 128,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        },
        seq_len=96,
    ),
    # Dynamic NTK agrees with transformers only while kvrelay's max_model_len stays within the
    # original context (see test_dynamic_ntk_basis_is_fixed_at_max_model_len for beyond it).
    Case(
        "rope-dynamic-within-original-ctx",
        {
            "max_position_embeddings": 48,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
        seq_len=48,
    ),
    Case("attention_bias+mlp_bias", {"attention_bias": True, "mlp_bias": True}),
    Case("mistral-full-attention", {"sliding_window": None}, arch="mistral"),
    # A window no shorter than the served length is full attention; kvrelay accepts it (and refuses
    # a longer length, test_sliding_window_shorter_than_served_length_is_refused).
    Case(
        "mistral-window-eq-max_model_len",
        {"sliding_window": 32},
        seq_len=32,
        arch="mistral",
        max_model_len=32,
    ),
]

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def _randomize(model: torch.nn.Module) -> None:
    """Weights that exercise every term: transformers' init leaves biases at 0 and norms at 1.

    Projections get std 1/sqrt(fan_in) so attention is far from uniform (rope and masking
    matter); embeddings keep a small std (0.02), as trained Llamas have, so RMSNorm's eps matters.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)


def _build(case: Case, out: Path) -> transformers.PreTrainedModel:
    config_cls, model_cls = _CLASSES[case.arch]
    config = config_cls(**{**BASE, **case.overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = model_cls(config)
    _randomize(model)
    model.save_pretrained(out, safe_serialization=True)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``checkpoint(case)`` -> (directory, transformers model), built once per case per module."""
    built: dict[str, tuple[Path, transformers.PreTrainedModel]] = {}

    def get(case: Case) -> tuple[Path, transformers.PreTrainedModel]:
        if case.id not in built:
            out = tmp_path_factory.mktemp("hf")
            built[case.id] = (out, _build(case, out))
        return built[case.id]

    return get


def _ids(vocab_size: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, seq_len), generator=torch.Generator().manual_seed(7))


def _hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _load(path: Path, max_model_len: int | None = None) -> LlamaForCausalLM:
    return load_model(path, dtype=torch.float32, max_model_len=max_model_len)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_logits_match_transformers(case: Case, checkpoint) -> None:
    path, hf = checkpoint(case)
    ours = _load(path, case.max_model_len)
    assert ours.config.num_key_value_heads == hf.config.num_key_value_heads
    assert ours.config.head_dim == hf.config.head_dim
    ids = _ids(hf.config.vocab_size, case.seq_len)
    err = rel_err(ours.full_forward_logits(ids), _hf_logits(hf, ids))
    assert err < REL_TOL, f"{case.id}: max |kvrelay - transformers| / max |logit| = {err:.2e}"


def test_tied_checkpoint_shares_the_embedding(checkpoint) -> None:
    """transformers writes one tensor for tied embeddings; kvrelay must reuse it as the LM head."""
    path, _ = checkpoint(next(c for c in CASES if c.id == "tied-embeddings"))
    model = _load(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sliding_window_shorter_than_served_length_is_refused(checkpoint, tmp_path: Path) -> None:
    """kvrelay has no sliding-window attention: a Mistral window shorter than the served length
    would silently turn into full attention past the window, so load_model refuses it and names
    the fix. At exactly the window length nothing changes (the window case above matches
    transformers); past it transformers' windowed output does differ from full
    attention, which is why the limit is the window and not more."""
    case = next(c for c in CASES if c.id == "mistral-window-eq-max_model_len")
    path, hf = checkpoint(case)
    window = hf.config.sliding_window
    with pytest.raises(ConfigError, match=r"sliding_window 32 is smaller than .* 64 \(max_position_embed"):
        _load(path)
    with pytest.raises(ConfigError, match=r"serve with --max-model-len 32 or less"):
        _load(path, max_model_len=window + 1)
    assert _load(path, max_model_len=window).max_model_len == window

    # The same weights with the window removed from config.json: full attention at any length.
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "sliding_window": None}))
    full = _load(tmp_path)
    ids = _ids(hf.config.vocab_size, window + 8)
    windowed_ref, full_ours = _hf_logits(hf, ids), full.full_forward_logits(ids)
    assert rel_err(full_ours[:, :window], windowed_ref[:, :window]) < REL_TOL
    assert rel_err(full_ours[:, window:], windowed_ref[:, window:]) > 1000 * REL_TOL


def test_dynamic_ntk_basis_is_fixed_at_max_model_len(checkpoint) -> None:
    """Dynamic NTK past the original context: a documented, deliberate difference.

    transformers recomputes the rope base from each forward's sequence length (and keeps the
    largest basis it has seen, so every length gets a fresh model here). kvrelay fixes the base at
    max_model_len: keys already in the paged cache were rotated with the basis they were written
    with, and a decode step cannot re-rotate them. With max_position_embeddings 48:
    - max_model_len 48 (the default): the unscaled basis, equal to transformers up to 48 tokens
      (the parametrized case above, and 40 tokens here);
    - max_model_len 64: every length uses the 64-token basis. At exactly 64 tokens that is
      transformers' basis too and they agree; at 56 tokens, and even at 40 (inside the original
      context), kvrelay equals the first positions of transformers' 64-token run and differs from
      transformers' own run at that length.
    """
    case = next(c for c in CASES if c.id == "rope-dynamic-within-original-ctx")
    path, _ = checkpoint(case)
    ids = _ids(BASE["vocab_size"], 64)

    def fresh_hf(seq_len: int) -> torch.Tensor:
        hf = transformers.LlamaForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        return _hf_logits(hf, ids[:, :seq_len])

    ref40, ref56, ref64 = fresh_hf(40), fresh_hf(56), fresh_hf(64)
    assert rel_err(_load(path).full_forward_logits(ids[:, :40]), ref40) < REL_TOL

    ours = _load(path, max_model_len=64)
    assert rel_err(ours.full_forward_logits(ids), ref64) < REL_TOL
    for n, ref in ((56, ref56), (40, ref40)):
        ours_n = ours.full_forward_logits(ids[:, :n])
        assert rel_err(ours_n, ref64[:, :n]) < REL_TOL, n
        assert rel_err(ours_n, ref) > 1000 * REL_TOL, n
