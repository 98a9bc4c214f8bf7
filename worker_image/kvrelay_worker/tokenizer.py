"""Torch-free tokenizer: `tokenizer.json` via `tokenizers`, chat template via jinja2, streaming decode.

The router uses this module, so it must never import torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# Used when the checkpoint's tokenizer_config.json has no `chat_template`: ChatML, the most common
# convention; documented in the README. Tokens like `<|im_start|>` are plain text to a tokenizer that
# does not define them, which is harmless.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: vocabulary character -> the byte it stands for.

    Printable bytes stand for themselves; the others are shifted to U+0100 and up, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars |= {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(decoder: Any) -> set[str]:
    """The decoder types of a tokenizer.json (a Sequence's members included)."""
    if not isinstance(decoder, dict):
        return set()
    return {decoder.get("type", ""), *(t for d in decoder.get("decoders", ()) for t in _decoder_types(d))}


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template and end-of-sequence ids."""

    def __init__(self, hf: HFTokenizer, config: dict[str, Any], eos_token_ids: Sequence[int]) -> None:
        self._hf = hf
        self.config = config
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.eos_token_ids: list[int] = sorted(set(eos_token_ids))
        self.chat_template = self._pick_template(config.get("chat_template"))
        # The decoder's JSON (its pickled state) says how vocabulary pieces map back to bytes.
        self._decoders = _decoder_types(json.loads(hf.decoder.__getstate__()) if hf.decoder else None)
        self._added = {i: (t.content, t.special) for i, t in hf.get_added_tokens_decoder().items()}
        self._bytes: dict[int, bytes] = {}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        self._template = env.from_string(self.chat_template)
        # a template that reads `tools` renders them itself; others get kvrelay's format (router/tools.py)
        self.template_takes_tools = "tools" in meta.find_undeclared_variables(env.parse(self.chat_template))

    @staticmethod
    def _pick_template(raw: Any) -> str:
        """HF allows one template or a list of named ones; take `default` (or the first)."""
        if isinstance(raw, str) and raw:
            return raw
        if isinstance(raw, list) and raw:
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            return named.get("default") or next(iter(named.values()))
        return DEFAULT_CHAT_TEMPLATE

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and the EOS ids of `generation_config.json`."""
        root = Path(path)
        hf = HFTokenizer.from_file(str(root / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (root / "tokenizer_config.json").exists():
            config = json.loads((root / "tokenizer_config.json").read_text())
        eos_ids: list[int] = []
        eos_text = _token_content(config.get("eos_token"))
        if eos_text is not None and hf.token_to_id(eos_text) is not None:
            eos_ids.append(hf.token_to_id(eos_text))
        # generation_config / config may name more EOS ids (e.g. Llama 3 `<|eot_id|>`).
        for name in ("generation_config.json", "config.json"):
            if (root / name).exists():
                value = json.loads((root / name).read_text()).get("eos_token_id")
                if isinstance(value, int):
                    eos_ids.append(value)
                elif isinstance(value, list):
                    eos_ids.extend(v for v in value if isinstance(v, int))
        return cls(hf, config, eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """A special token: `decode(skip_special_tokens=True)` leaves it out of the text."""
        added = self._added.get(token_id)
        return added is not None and added[1]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, even when they are part of a multi-byte character.

        Byte-level BPE: each vocabulary character maps back to one byte (GPT-2's alphabet);
        SentencePiece byte fallback: `<0xHH>` is that byte; added and special tokens: their text.
        Other vocabularies: the UTF-8 of the token decoded on its own.
        """
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = self._raw_bytes(token_id)
        return raw

    def _raw_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id][0].encode()
        piece = self._hf.id_to_token(token_id)
        if piece is None:
            return b""
        if "ByteLevel" in self._decoders and all(c in BYTE_LEVEL_ALPHABET for c in piece):
            return bytes(BYTE_LEVEL_ALPHABET[c] for c in piece)
        if "ByteFallback" in self._decoders and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if "Metaspace" in self._decoders or "Replace" in self._decoders:
            return piece.replace("\u2581", " ").encode()  # SentencePiece's word-boundary marker is a space
        return self.decode([token_id], skip_special_tokens=False).encode()

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render the chat template to the prompt text (special tokens such as BOS included by it);
        ``tools`` (OpenAI signatures) only for a template that takes them."""
        extra = {"tools": list(tools)} if tools else {}
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a chat prompt; the template already writes BOS, so none is added (as HF does)."""
        text = self.render_chat(messages, add_generation_prompt, tools)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals `decode(all ids)`.

    Decoding one token alone loses context (a leading-space marker, half of a UTF-8 character split
    across byte tokens), so each step decodes a short window that starts one emitted token back
    and emits only the new suffix; a trailing U+FFFD means an incomplete character, so we wait.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start: context for the next decode
        self._read_offset = 0  # tokens before this index are already emitted as text
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is pending, even an incomplete character (end of the stream)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self.token_ids[self._prefix_offset :]
        prefix_text = self._tokenizer.decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(window)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta


class StopStringMatcher:
    """Holds back text that may be the start of a stop string; cuts the output at the first match."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Return the text safe to emit now; sets `stopped` once a stop string was seen."""
        if self.stopped:
            return ""
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = 0
        for s in self._stop:
            # Longest suffix of `text` that is a proper prefix of this stop string.
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """End of generation: the held-back text was not a stop string after all."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
