"""Torch-free tokenizer: streaming detokenization, stop strings, chat templates, EOS ids."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from kvrelay_worker.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    IncrementalDetokenizer,
    StopStringMatcher,
    Tokenizer,
)

from .conftest import write_tokenizer_dir


def test_incremental_detokenization_equals_full_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    texts = ["héllo wörld — naïve café, 東京 and 🙂 emoji", "the quick brown fox 42"]
    sequences = [tokenizer.encode(t) for t in texts]
    # Random ids also produce invalid UTF-8 byte runs: deltas must still add up to the full decode.
    sequences += [[rng.randrange(2, tokenizer.vocab_size) for _ in range(40)] for _ in range(20)]
    for ids in sequences:
        detok = IncrementalDetokenizer(tokenizer)
        deltas = [detok.push(t) for t in ids] + [detok.flush()]
        assert "".join(deltas) == tokenizer.decode(ids)


def test_multibyte_character_waits_for_all_its_bytes(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # a 4-byte emoji is split over several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🙂"


@pytest.mark.parametrize(
    ("stop", "pieces", "emitted", "stopped"),
    [
        (["STOP"], ["abc", "ST", "OP tail"], ["abc", "", ""], True),
        (["STOP"], ["abc", "ST", "ay"], ["abc", "", "STay"], False),
        (["xy", "yz"], ["aay", "z"], ["aa", ""], True),
        ([], ["a", "b"], ["a", "b"], False),
        (["\n\n"], ["line\n", "\nnext"], ["line", ""], True),
    ],
)
def test_stop_string_matcher(stop: list[str], pieces: list[str], emitted: list[str], stopped: bool) -> None:
    matcher = StopStringMatcher(stop)
    assert [matcher.feed(p) for p in pieces] == emitted
    assert matcher.stopped is stopped


def test_stop_matcher_flush_releases_held_prefix() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abcST") == "abc"
    assert matcher.flush() == "ST"


def test_default_and_checkpoint_chat_templates(tmp_path: Path, tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.render_chat(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    custom = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}{% endfor %}"
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "custom", chat_template=custom))
    assert tok.render_chat([{"role": "user", "content": " yo "}]) == "<s>[user]yo"
    assert tok.encode_chat([{"role": "user", "content": "yo"}])[0] == 0  # BOS from the template, once


def test_eos_ids_from_config_files(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token_ids == [1]
    assert tokenizer.decode([1]) == ""  # special tokens never reach the client's text


def test_tokenizer_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, kvrelay_worker.tokenizer, kvrelay_worker.router.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
