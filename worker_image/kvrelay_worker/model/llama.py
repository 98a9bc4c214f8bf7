"""Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a flat token batch.

Parameter names match Hugging Face's ``LlamaForCausalLM`` so a checkpoint's state dict loads as is.
The forward pass runs fused projections (one QKV matmul, one gate/up matmul per layer): their
weights are one tensor each, and the per-projection parameters are views into it, so state dicts
keep Hugging Face's names while a decode step makes 4 matmuls per layer instead of 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvrelay_worker.model.attention import AttentionBackend
from kvrelay_worker.model.config import LlamaConfig
from kvrelay_worker.model.parallel import SINGLE, TensorParallel, check_divides
from kvrelay_worker.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 like the reference implementation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; the same arithmetic as below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears sharing an input; re-point each at its slice."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    row = 0
    for lin in linears:
        rows = lin.out_features
        lin.weight = nn.Parameter(weight[row : row + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row : row + rows], requires_grad=False)
        row += rows
    return weight, bias


def _row_parallel(x: torch.Tensor, linear: nn.Linear, tp: TensorParallel) -> torch.Tensor:
    """A row-parallel projection: this rank's partial product, summed over ranks, then the bias once."""
    if tp.size == 1:  # one fused kernel, as without tensor parallelism
        return F.linear(x, linear.weight, linear.bias)
    out = tp.all_reduce(F.linear(x, linear.weight))
    return out if linear.bias is None else out + linear.bias


class LlamaAttention(nn.Module):
    """Attention over this rank's heads (all of them at TP=1)."""

    def __init__(self, config: LlamaConfig, layer_idx: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        self.num_heads = config.num_attention_heads // tp.size
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.head_dim = config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.fuse()

    def fuse(self) -> None:
        """(Re)build the QKV weight after the projections' parameters were replaced (loading)."""
        self.qkv_weight, self.qkv_bias = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend
    ) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        # Q and K sit side by side in the fused output: rotate all their heads in one pass.
        qk = qkv[:, : q_size + kv_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(qk, *cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size :].view(n, self.num_kv_heads, self.head_dim)
        out = attn(self.layer_idx, q, k, v)
        return _row_parallel(out.reshape(n, q_size), self.o_proj, self.tp)


class LlamaMLP(nn.Module):
    """SwiGLU over this rank's share of the intermediate rows."""

    def __init__(self, config: LlamaConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        h, i, bias = config.hidden_size, config.intermediate_size // tp.size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.fuse()

    def fuse(self) -> None:
        """(Re)build the gate/up weight after the projections' parameters were replaced (loading)."""
        self.gate_up_weight, self.gate_up_bias = _fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return _row_parallel(F.silu(gate) * up, self.down_proj, self.tp)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head. ``forward`` returns final hidden states [N, hidden].

    With ``tp`` of size > 1 the layers hold this rank's shard (``model/parallel.py``); ``config``
    stays the whole model's, and ``num_kv_heads_local`` is what this rank's KV cache holds.
    """

    def __init__(
        self, config: LlamaConfig, max_model_len: int | None = None, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        check_divides(config, tp.size)
        self.config = config
        self.tp = tp
        self.num_kv_heads_local = config.num_key_value_heads // tp.size
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.model = LlamaModel(config, tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(config, self.max_model_len)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """Run the decoder over N flat tokens at ``positions``; ``attn`` groups them into sequences."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions)  # once per forward, shared by every layer
        for layer in self.model.layers:
            x = layer(x, cos_sin, attn)
        return self.model.norm(x)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # .to(), .float(), .cuda() and to_empty() give every parameter a new tensor: the projections
        # then no longer view the fused weights, so rebuild those.
        super()._apply(fn, recurse)
        self.fuse_projections()
        return self

    def fuse_projections(self) -> None:
        """Rebuild every fused weight; call after replacing parameters (``load_state_dict(assign=True)``)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 for the selected hidden rows."""
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def full_forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reference: logits [B, T, V] of a full causal recompute over ``input_ids`` [B, T], no cache."""
        from kvrelay_worker.model.attention import DenseCausalAttention

        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).repeat(b)
        hidden = self.forward(input_ids.reshape(-1), positions, DenseCausalAttention(b, t))
        return self.compute_logits(hidden).view(b, t, -1)
