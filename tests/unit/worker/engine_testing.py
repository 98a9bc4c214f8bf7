"""Helpers the engine tests share (a plain module: conftest.py is not importable by name)."""

from __future__ import annotations

from kvrelay_worker.engine import Engine


def count_preemptions(engine: Engine) -> list[int]:
    """Counts the engine scheduler's preemptions from now on, in the returned one-element list."""
    count = [0]
    preempt = engine.scheduler._preempt

    def counting(request, out):  # type: ignore[no-untyped-def]
        count[0] += 1
        preempt(request, out)

    engine.scheduler._preempt = counting  # type: ignore[method-assign]
    return count
