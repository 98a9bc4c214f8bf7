"""Inference engine: paged KV cache, torch-free scheduler, model runner, sampling."""

from kvrelay_worker.engine.core import Engine, EngineConfig, EngineStats, StepResult
from kvrelay_worker.engine.request import Request, RequestStatus
from kvrelay_worker.engine.sampling_params import SamplingParams
from kvrelay_worker.engine.scheduler import KVTarget, RequestOutput, RequestRefused

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
    "StepResult",
]
