"""Checks of the API's logprobs against a reference log-softmax row (the engine's or transformers')."""

from __future__ import annotations

import torch
from kvrelay_worker.router.logprobs import token_text
from kvrelay_worker.tokenizer import Tokenizer


def ids_by_bytes(tokenizer: Tokenizer) -> dict[bytes, int]:
    """bytes -> token id; the chat API names tokens by their bytes."""
    table = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size)}
    assert len(table) == tokenizer.vocab_size, "two tokens share their bytes: names would be ambiguous"
    return table


def ids_by_name(tokenizer: Tokenizer) -> dict[str, int]:
    """token name -> id; the completions API names tokens by their text (`bytes:\\x..` for partial ones)."""
    return {token_text(raw): i for raw, i in ids_by_bytes(tokenizer).items()}


def check_position(
    row: torch.Tensor, token: int, logprob: float, top: list[tuple[int, float]], k: int, tol: float
) -> float:
    """One position: the token's logprob and its top-k alternatives against the reference row; returns the
    largest difference seen.

    The alternatives must be the reference's top k in its order, except where two of them are within
    2 * tol of each other in the reference (each side may be off by tol, so either may rank first).
    """
    worst = abs(logprob - float(row[token]))
    assert worst <= tol, f"token {token}: {logprob} vs reference {float(row[token])}"
    ref = row.topk(k).indices.tolist()
    assert len(top) == k, top
    for j, (i, lp) in enumerate(top):
        diff = abs(lp - float(row[i]))
        worst = max(worst, diff)
        assert diff <= tol, f"alternative {i}: {lp} vs reference {float(row[i])}"
        if i != ref[j]:
            gap = abs(float(row[i]) - float(row[ref[j]]))
            assert gap <= 2 * tol, f"top {j}: {i} where the reference has {ref[j]}, {gap:.3g} apart"
    return worst
