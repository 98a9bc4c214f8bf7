"""Structured output on the worker: llguidance matchers that mask the logits of constrained requests.

The router compiles a request's JSON schema, regex or Lark grammar into one llguidance grammar
(``SamplingParams.grammar``); here each request gets a matcher over the model's vocabulary. The matcher's
state is a pure function of the tokens it consumed, so a request resumed on another worker (migration,
or the decode half after a prefill) replays its earlier output into a new matcher and goes on where the
old one was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class GrammarRefused(ValueError):
    """The grammar does not compile, or the tokens already generated do not match it."""


class GrammarCompiler:
    """Makes matchers for one model: its tokenizer (built on first use: ~0.5 s for a 49k vocabulary)."""

    def __init__(self, tokenizer_json: Path | None, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: Any = None

    def _llg_tokenizer(self) -> Any:
        import llguidance

        if self._tokenizer is None:
            if self._tokenizer_json is None or not self._tokenizer_json.is_file():
                raise GrammarRefused(
                    "structured output needs the model's tokenizer.json, which this worker lacks"
                )
            self._tokenizer = llguidance.LLTokenizer(
                self._tokenizer_json.read_text(), n_vocab=self._vocab_size, eos_token=self._eos
            )
        return self._tokenizer

    def matcher(self, grammar: str, earlier: Sequence[int] = ()) -> Any:
        """A matcher for ``grammar`` that has consumed ``earlier`` (tokens this request already generated)."""
        import llguidance

        m = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise GrammarRefused(f"the grammar does not compile: {m.get_error()}")
        if earlier and not m.consume_tokens(list(earlier)):
            raise GrammarRefused(f"the tokens generated so far do not match the grammar: {m.get_error()}")
        return m


def allowed_tokens(matcher: Any, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The tokens ``matcher`` allows next: a bool [vocab_size] tensor (llguidance gives one bit a token)."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    mask = np.unpackbits(bits, bitorder="little")[:vocab_size].astype(bool)
    t = torch.from_numpy(mask)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)
