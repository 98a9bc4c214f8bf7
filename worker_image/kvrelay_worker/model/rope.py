"""Rotary position embeddings with the rope-scaling variants Llama-family checkpoints use."""

from __future__ import annotations

import math

import torch

from kvrelay_worker.model.config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, max_model_len: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32) after applying ``config.rope_scaling``.

    ``dynamic`` (NTK) scaling is fixed at ``max_model_len`` rather than the running sequence
    length, so keys already in the paged cache keep the basis they were written with; for
    ``max_model_len <= max_position_embeddings`` it equals the unscaled basis, as in transformers.
    """
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling
    if scaling.rope_type == "dynamic" and max_model_len > config.max_position_embeddings:
        ratio = scaling.factor * max_model_len / config.max_position_embeddings - (scaling.factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, config)
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, a smooth ramp between."""
    s = config.rope_scaling
    old_len = s.original_max_position_embeddings or config.max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    ramp = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, ramp)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (rotate-half convention)."""

    def __init__(self, config: LlamaConfig, max_model_len: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config, max_model_len)
        t = torch.arange(max_model_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.max_model_len = max_model_len
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [N, 1, D/2] for tokens at ``positions`` [N]; what ``apply_rotary`` takes."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate q [N, Hq, D] and k [N, Hkv, D] for tokens at ``positions`` [N]."""
        cos, sin = self.cos_sin(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [N, H, D]: row i pairs with row i + D/2 (Hugging Face's convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
