"""Greedy text through the OpenAI API vs the single-process engine (shared/notes/token-equality.md).

A uniquely named helper module (not conftest), importable by any e2e test module. The reference is
the engine's greedy continuation with the top-2 logit margin at every step; a text differs only
legitimately where it first leaves the reference at a step whose margin is below ``near_tie``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvrelay_worker.engine.sampling_params import SamplingParams
from kvrelay_worker.tokenizer import Tokenizer


@dataclass
class Reference:
    tokens: list[int]
    margins: list[float]  # top-2 logit margin at every generated step


def greedy_references(
    engine: Any, tokenizer: Tokenizer, prompts: list[str], max_tokens: int
) -> list[Reference]:
    """The engine's greedy continuations (ignore_eos) and their margins, from a full recompute."""
    ids = [tokenizer.encode(p) for p in prompts]
    outs = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    refs = []
    for prompt, out in zip(ids, outs, strict=True):
        logits = engine.model.full_forward_logits(torch.tensor([prompt + out]))[0, len(prompt) - 1 : -1]
        top = torch.topk(logits.float(), 2, dim=-1).values
        refs.append(Reference(out, (top[:, 0] - top[:, 1]).tolist()))
    return refs


def check_greedy(
    tokenizer: Tokenizer, refs: list[Reference], texts: list[str], near_tie: float, max_near_ties: int
) -> list[tuple[int, int]]:
    """Fail unless every text is the reference's or first differs at a near-tie; returns the near-ties."""
    near_ties, bad = [], []
    for i, (ref, text) in enumerate(zip(refs, texts, strict=True)):
        if text == tokenizer.decode(ref.tokens):
            continue
        step = next(
            (k for k in range(len(ref.tokens)) if not text.startswith(tokenizer.decode(ref.tokens[: k + 1]))),
            None,
        )
        if step is not None and ref.margins[step] < near_tie:
            near_ties.append((i, step))
        else:
            margin = None if step is None else ref.margins[step]
            bad.append((i, step, margin, text, tokenizer.decode(ref.tokens)))
    assert not bad, bad
    assert len(near_ties) <= max_near_ties, near_ties
    return near_ties
