"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seed."""

from __future__ import annotations

import torch

from kvrelay_worker.engine.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row of ``logits`` [B, V] (fp32).

    A seeded request draws from a generator seeded with (seed, step), so its tokens do not depend
    on which other requests share the batch, or on preemption and recompute.
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
            gen = torch.Generator(device=logits.device).manual_seed((p.seed * 1_000_003 + step) % 2**63)
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
