"""Fixtures for the worker unit tests: one tiny checkpoint per session, leak checks per engine.

``KVRELAY_TEST_DEVICE=cuda`` and ``KVRELAY_TEST_DTYPE=bfloat16`` run the engine tests on a GPU
(``bench/gpu_check.sh``); the default is CPU fp32.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kvrelay_worker.engine import Engine, EngineConfig
from kvrelay_worker.model import LlamaForCausalLM, load_model
from kvrelay_worker.model.tiny import make_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads; on a shared 2-core host they only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


DEVICE = os.environ.get("KVRELAY_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("KVRELAY_TEST_DTYPE")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return load_model(tiny_dir, device=DEVICE, dtype=getattr(torch, DTYPE) if DTYPE else None)


@pytest.fixture
def make_engine(tiny_model: LlamaForCausalLM) -> Iterator:
    """Build engines on the shared model; after the test every block must be back in the pool."""
    engines: list[Engine] = []

    def make(**kwargs) -> Engine:
        engine = Engine(tiny_model, EngineConfig(**kwargs))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        pool = engine.scheduler.pool
        assert pool.num_used_blocks == 0, f"leaked {pool.num_used_blocks} blocks"
        assert all(c == 0 for c in pool.ref_counts)
        assert not engine.scheduler.requests


@pytest.fixture(scope="session")
def reference(tiny_model: LlamaForCausalLM):
    """``reference(prompt, n)``: greedy tokens of the tiny model by full recompute."""
    return lambda prompt, n: reference_greedy(tiny_model, prompt, n)


def reference_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from a plain full-recompute forward (no cache) at every step."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(n):
        token = int(model.full_forward_logits(ids)[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return out
