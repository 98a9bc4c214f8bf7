"""OpenAI-compatible router: HTTP front end, worker discovery and routing (never imports torch)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point used by `kvrelay-worker --role router`."""
    from kvrelay_worker.router.main import main as _main

    _main(argv)


__all__ = ["main"]
