"""Attention backends the decoder calls per layer, plus two dense ones (reference and baseline).

The decoder works on a flat batch of N tokens; a backend knows how those tokens group into
sequences and where their keys and values live (nowhere, a dense cache, or the paged cache).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    """Computes attention for one layer; q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]."""

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class DenseCausalAttention:
    """Full recompute without a cache: B equal-length sequences of T tokens, causal. The reference."""

    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.batch_size = batch_size
        self.seq_len = seq_len

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t = self.batch_size, self.seq_len
        qb = q.view(b, t, *q.shape[1:]).transpose(1, 2)
        kb = k.view(b, t, *k.shape[1:]).transpose(1, 2)
        vb = v.view(b, t, *v.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)


class DenseKVCacheAttention:
    """A plain contiguous per-layer cache [B, Hkv, max_len, D] for B sequences of equal length.

    This is the "bare model forward" baseline the engine's overhead is measured against.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, 2, batch_size, num_kv_heads, max_len, head_dim)
        self.cache = torch.zeros(shape, dtype=dtype, device=device)
        self.batch_size = batch_size
        self.length = 0  # tokens already cached per sequence
        self.step_len = 0  # tokens being added by the current forward

    def begin(self, num_new_tokens: int) -> None:
        """Call before each forward with the number of new tokens per sequence."""
        self.step_len = num_new_tokens

    def end(self) -> None:
        self.length += self.step_len

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, start = self.batch_size, self.step_len, self.length
        end = start + t
        kc, vc = self.cache[layer_idx, 0], self.cache[layer_idx, 1]
        kc[:, :, start:end] = k.view(b, t, *k.shape[1:]).transpose(1, 2)
        vc[:, :, start:end] = v.view(b, t, *v.shape[1:]).transpose(1, 2)
        qb = q.view(b, t, *q.shape[1:]).transpose(1, 2)
        if t == 1:
            out = F.scaled_dot_product_attention(qb, kc[:, :, :end], vc[:, :, :end], enable_gqa=True)
        else:
            mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(
                qb, kc[:, :, :end], vc[:, :, :end], attn_mask=mask, enable_gqa=True
            )
        return out.transpose(1, 2).reshape(q.shape)
