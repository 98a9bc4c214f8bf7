"""Logprob formatting (chat, legacy completions, echo, text offsets) on hand-made worker data."""

from __future__ import annotations

import math

from kvrelay_worker.router.app import Answer
from kvrelay_worker.router.generate import TextDelta
from kvrelay_worker.router.logprobs import (
    MIN_LOGPROB,
    TextOffsets,
    TokenLogprob,
    chat_logprobs,
    completion_logprobs,
    token_text,
)
from kvrelay_worker.tokenizer import BYTE_LEVEL_ALPHABET, Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models


class Names:
    """A vocabulary by hand: id -> bytes; id 0 is a special token."""

    VOCAB = {0: b"</s>", 1: b"Hi", 2: b" there", 3: b" \xe6", 4: b"\x9d\xb1", 5: b"!", 6: b"\xe4\xba\xac"}

    def token_bytes(self, token_id: int) -> bytes:
        return self.VOCAB[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id == 0


NAMES = Names()


def test_token_text_is_utf8_or_openai_bytes_spelling() -> None:
    assert token_text(b" there") == " there"
    assert token_text("東".encode()) == "東"
    assert token_text(b" \xe6") == "bytes:\\x20\\xe6"  # part of a character: no U+FFFD, nothing collides
    assert token_text(b"\x9d\xb1") == "bytes:\\x9d\\xb1"


def test_chat_logprobs_shape() -> None:
    tokens = [
        TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.25))),
        TokenLogprob(3, -2.0, ((5, -0.1), (3, -2.0))),
        TokenLogprob(0, -math.inf, ()),
    ]
    got = chat_logprobs(NAMES, tokens)
    assert got["refusal"] is None
    first, partial, eos = got["content"]
    assert first == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
            {"token": " there", "logprob": -1.25, "bytes": list(b" there")},
        ],
    }
    # A token that is half of a character: its own bytes, not the replacement character's.
    assert partial["bytes"] == [0x20, 0xE6] and partial["token"] == "bytes:\\x20\\xe6"
    assert [t["token"] for t in partial["top_logprobs"]] == ["!", "bytes:\\x20\\xe6"]
    # -inf is not JSON: OpenAI's floor instead; a special token is named by its text.
    assert eos == {"token": "</s>", "logprob": MIN_LOGPROB, "bytes": list(b"</s>"), "top_logprobs": []}
    assert chat_logprobs(NAMES, []) == {"content": [], "refusal": None}


def test_text_offsets_count_characters_of_the_tokens_bytes() -> None:
    offsets = TextOffsets(NAMES, start=10)
    # "Hi" " there" " 東" (split over two tokens) "!" </s> (no text) "京"
    got = [offsets.next(t) for t in (1, 2, 3, 4, 5, 0, 6)]
    # " \xe6" starts at 18 (its space); "\x9d\xb1" continues the character begun at 19
    assert got == [10, 12, 18, 19, 20, 21, 21]
    assert offsets.chars == 22
    stray = TextOffsets(NAMES)  # continuation bytes with no character begun: each its own U+FFFD
    assert [stray.next(4), stray.next(5)] == [0, 2]


def test_completion_logprobs_legacy_shape() -> None:
    tokens = [
        TokenLogprob(2, -0.75, ((5, -0.5), (2, -0.75))),  # in its own top
        TokenLogprob(5, -3.0, ((1, -0.25),)),  # not in its top: added (up to logprobs + 1 entries)
        TokenLogprob(1, -0.25, ()),  # logprobs=0: the chosen token only
    ]
    got = completion_logprobs(NAMES, tokens, TextOffsets(NAMES, start=2))
    assert got == {
        "tokens": [" there", "!", "Hi"],
        "token_logprobs": [-0.75, -3.0, -0.25],
        "top_logprobs": [{"!": -0.5, " there": -0.75}, {"Hi": -0.25, "!": -3.0}, {"Hi": -0.25}],
        "text_offset": [2, 8, 9],
    }


def test_completion_logprobs_with_a_bare_first_prompt_token() -> None:
    got = completion_logprobs(NAMES, [1, TokenLogprob(2, -4.5, ((5, -0.5),))], TextOffsets(NAMES))
    assert got["tokens"] == ["Hi", " there"]
    assert got["token_logprobs"] == [None, -4.5]
    assert got["top_logprobs"] == [None, {"!": -0.5, " there": -4.5}]
    assert got["text_offset"] == [0, 2]


def test_same_name_keeps_the_more_likely_token() -> None:
    names = Names()
    names.VOCAB = {**Names.VOCAB, 7: b"!"}  # two ids spelled "!"
    got = completion_logprobs(names, [TokenLogprob(7, -2.0, ((5, -0.5), (7, -2.0)))], TextOffsets(names))
    assert got["top_logprobs"] == [{"!": -0.5}]


def test_answer_echo_streamed_and_whole_agree() -> None:
    """Echo: the prompt first (its first token with null logprobs), then the completion's tokens."""
    prompt = [TokenLogprob(2, -5.0, ((2, -5.0),))]
    tokens = [TokenLogprob(5, -0.5, ((5, -0.5),)), TokenLogprob(0, -1.0, ((0, -1.0),))]

    def answer() -> Answer:
        return Answer("completion", NAMES, 1, [1, 2], "Hi there", echo=True)  # type: ignore[arg-type]

    whole = answer().whole(prompt, "!", tokens)
    assert whole["text"] == "Hi there!"
    lp = whole["logprobs"]
    assert lp["tokens"] == ["Hi", " there", "!", "</s>"]
    assert lp["token_logprobs"] == [None, -5.0, -0.5, -1.0]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][3] == {"</s>": -1.0}
    assert lp["text_offset"] == [0, 2, 8, 9]
    streamed = answer()
    head = streamed.prompt(prompt)
    parts = [*streamed.delta(TextDelta("!", tokens[:1])), *streamed.delta(TextDelta("", tokens[1:]))]
    assert head["text"] + "".join(p["text"] for p in parts) == whole["text"]
    merged = {k: [*head["logprobs"][k], *(v for p in parts for v in p["logprobs"][k])] for k in lp}
    assert merged == lp


def test_answer_without_echo_offsets_count_from_the_prompt() -> None:
    """As OpenAI's legacy API: text_offset is into prompt + completion even when the prompt is not echoed."""
    answer = Answer("completion", NAMES, 0, [1], "Hi", echo=False)  # type: ignore[arg-type]
    got = answer.whole(None, " there", [TokenLogprob(2, -0.5)])
    assert got == {
        "text": " there",
        "logprobs": {
            "tokens": [" there"],
            "token_logprobs": [-0.5],
            "top_logprobs": [{" there": -0.5}],
            "text_offset": [2],
        },
    }
    plain = Answer("completion", NAMES, None, [1], "Hi", echo=True)  # type: ignore[arg-type]
    assert plain.whole(None, "", []) == {"text": "Hi", "logprobs": None}
    chat = Answer("chat", NAMES, None, [1])  # type: ignore[arg-type]
    assert chat.whole(None, "ok", [])["logprobs"] is None
    assert chat.delta(TextDelta("ok"))[0]["logprobs"] is None


def test_tokenizer_maps_ids_to_their_bytes(tokenizer: Tokenizer) -> None:
    """Byte-level BPE: every vocabulary character stands for one byte; concatenated, a text's tokens give
    its UTF-8 bytes, also when a character is split over tokens."""
    assert len(BYTE_LEVEL_ALPHABET) == 256 and sorted(BYTE_LEVEL_ALPHABET.values()) == list(range(256))
    text = "héllo wörld — naïve café, 東京 and 🙂 emoji; 日本 ñ"  # the last ones are not in its corpus
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(token_text(p).startswith("bytes:") for p in pieces)  # the test covers split characters
    for i in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(i)
        assert raw.decode("utf-8", "replace") == tokenizer.decode([i], skip_special_tokens=False), i
    eos = tokenizer.eos_token_ids[0]
    assert tokenizer.is_special(eos) and tokenizer.token_bytes(eos) == b"</s>"
    assert not tokenizer.is_special(ids[0])


def test_sentencepiece_byte_fallback_vocabulary() -> None:
    """Llama-2 style vocabularies: `<0xHH>` pieces are one byte each, `▁` is a space."""
    vocab = {"<unk>": 0, "</s>": 1, "<0xE6>": 2, "<0x9D>": 3, "<0xB1>": 4, "▁hello": 5, "lo": 6}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.add_special_tokens(["</s>"])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = Tokenizer(hf, {}, [1])
    assert [tokenizer.token_bytes(i) for i in (2, 3, 4)] == [b"\xe6", b"\x9d", b"\xb1"]
    assert b"".join(tokenizer.token_bytes(i) for i in (2, 3, 4)).decode() == "東"
    assert tokenizer.token_bytes(5) == b" hello" and tokenizer.token_bytes(6) == b"lo"
    assert tokenizer.token_bytes(1) == b"</s>" and tokenizer.is_special(1)
