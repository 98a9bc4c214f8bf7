"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seed."""

from __future__ import annotations

import torch

from kvrelay_worker.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64 bits in which every input bit moves every output bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, index: int) -> int:
    """Generator seed for a seeded request's draw of output token ``index`` (63 bits).

    A pure function of (seed, index), so the draw at index k needs none of the earlier ones: a request
    resumed elsewhere at k (``SamplingParams.output_offset``) draws what the uninterrupted run would have.
    """
    return _mix64(_mix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row of ``logits`` [B, V] (fp32); ``steps`` are the rows' output-token counts so far.

    A seeded request draws from a generator seeded with (seed, output index), so its tokens do not
    depend on which other requests share the batch, on preemption and recompute, or on a migration.
    """
    tokens = logits.argmax(dim=-1).tolist()
    if all(p.greedy for p in params):
        return tokens
    for row, (p, step) in enumerate(zip(params, steps, strict=True)):
        if p.greedy:
            continue
        probs = _filtered_probs(logits[row], p)
        gen = None
        if p.seed is not None:
            seed = draw_seed(p.seed, p.output_offset + step)
            gen = torch.Generator(device=logits.device).manual_seed(seed)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens


def _filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scaled = row / p.temperature
    if p.top_k > 0 and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    return torch.softmax(scaled, dim=-1)
