"""Inference engine: paged KV cache, torch-free scheduler, model runner, sampling.

Names are resolved lazily so that the torch-free parts (``scheduler``, ``block_pool``,
``request``, ``sampling_params``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Engine": "core",
    "EngineConfig": "core",
    "EngineStats": "core",
    "StepResult": "core",
    "Request": "request",
    "TokenLogprobs": "request",
    "RequestStatus": "request",
    "SamplingParams": "sampling_params",
    "KVTarget": "scheduler",
    "RequestOutput": "scheduler",
    "RequestRefused": "scheduler",
    "StepLogprobs": "scheduler",
}

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "KVTarget",
    "Request",
    "RequestOutput",
    "RequestRefused",
    "RequestStatus",
    "SamplingParams",
    "StepLogprobs",
    "StepResult",
    "TokenLogprobs",
]

if TYPE_CHECKING:
    from kvrelay_worker.engine.core import Engine, EngineConfig, EngineStats, StepResult
    from kvrelay_worker.engine.request import Request, RequestStatus, TokenLogprobs
    from kvrelay_worker.engine.sampling_params import SamplingParams
    from kvrelay_worker.engine.scheduler import KVTarget, RequestOutput, RequestRefused, StepLogprobs


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
