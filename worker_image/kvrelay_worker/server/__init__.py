"""KServe v2 gRPC server for the prefill, decode and colocated roles."""

from kvrelay_worker.server.app import WorkerOptions, serve
from kvrelay_worker.server.servicer import DECODE_MODEL, PREFILL_MODEL, WorkerServicer

__all__ = ["DECODE_MODEL", "PREFILL_MODEL", "WorkerOptions", "WorkerServicer", "serve"]
