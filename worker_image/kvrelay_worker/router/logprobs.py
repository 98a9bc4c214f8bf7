"""Token logprobs as the workers report them, and their OpenAI shapes (chat and legacy completions).

Logprobs are the log-softmax of the model's raw logits, before logit_bias, penalties, temperature and
top-k/p (docs/wire-contracts.md section 3). A token's text is its bytes as UTF-8 when they are valid
UTF-8 on their own, else `bytes:\\xHH...` (OpenAI's legacy spelling), so no two tokens share a name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# OpenAI's stand-in for a logprob JSON cannot carry (-inf: a token the model rules out entirely).
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob and the most likely alternatives at its position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class TokenNames(Protocol):
    """What formatting needs of a tokenizer (`kvrelay_worker.tokenizer.Tokenizer` has it)."""

    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


def token_text(raw: bytes) -> str:
    """A token's name: its text, or `bytes:\\xHH...` when it is part of a multi-byte character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _clamp(logprob: float) -> float:
    """-inf (and NaN, which no comparison passes) become MIN_LOGPROB: JSON has neither."""
    return float(logprob) if logprob >= MIN_LOGPROB else MIN_LOGPROB


def _chat_entry(names: TokenNames, token_id: int, logprob: float) -> dict[str, Any]:
    raw = names.token_bytes(token_id)
    return {"token": token_text(raw), "logprob": _clamp(logprob), "bytes": list(raw)}


def chat_logprobs(names: TokenNames, tokens: Iterable[TokenLogprob]) -> dict[str, Any]:
    """Chat `choice.logprobs`: one entry per generated token with its `top_logprobs` alternatives."""
    content = [
        {
            **_chat_entry(names, t.token_id, t.logprob),
            "top_logprobs": [_chat_entry(names, i, lp) for i, lp in t.top],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def _continuations(lead: int) -> int:
    """How many continuation bytes a UTF-8 lead byte announces (0 for ASCII and invalid bytes)."""
    return 1 if 0xC0 <= lead < 0xE0 else 2 if 0xE0 <= lead < 0xF0 else 3 if 0xF0 <= lead < 0xF8 else 0


class TextOffsets:
    """Character offsets of tokens in the text they make up (`text_offset` of the legacy API).

    Counted on the tokens' bytes with UTF-8's rules: a token that continues a character begun by
    an earlier token gets that character's offset; special tokens, which the text leaves out, take
    no room; an invalid byte counts as one character (the U+FFFD decoding puts there).
    """

    def __init__(self, names: TokenNames, start: int = 0) -> None:
        self._names = names
        self.chars = start  # characters begun before the next token
        self._expect = 0  # continuation bytes the last character still needs

    def restart(self, chars: int) -> None:
        """Go on from `chars` characters, on a character boundary."""
        self.chars, self._expect = chars, 0

    def next(self, token_id: int) -> int:
        raw = b"" if self._names.is_special(token_id) else self._names.token_bytes(token_id)
        offset = self.chars
        for i, byte in enumerate(raw):
            if self._expect and 0x80 <= byte < 0xC0:
                self._expect -= 1
                if i == 0:
                    offset = self.chars - 1  # inside the character an earlier token began
            else:
                self.chars += 1
                self._expect = _continuations(byte)
        return offset


def completion_logprobs(
    names: TokenNames, tokens: Sequence[TokenLogprob | int], offsets: TextOffsets
) -> dict[str, Any]:
    """Legacy completions `choice.logprobs` for `tokens`, in order.

    A bare token id (the prompt's first token, which has no prefix to be predicted from) gets null
    logprobs. `top_logprobs` maps names to logprobs: the top alternatives plus the token itself, as
    OpenAI answers (up to `logprobs` + 1 entries).
    """
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        token_id = t if isinstance(t, int) else t.token_id
        out["tokens"].append(token_text(names.token_bytes(token_id)))
        out["text_offset"].append(offsets.next(token_id))
        if isinstance(t, int):
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_clamp(t.logprob))
        top: dict[str, float] = {}
        for i, lp in (*t.top, (t.token_id, t.logprob)):
            # setdefault: of two tokens with the same name, the more likely (listed first) keeps it
            top.setdefault(token_text(names.token_bytes(i)), _clamp(lp))
        out["top_logprobs"].append(top)
    return out
