"""Whether a request whose decode worker failed goes on elsewhere: a pure decision over the failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvrelay_worker.router.errors import OpenAIError, WorkerFailed, server_error

ResumeVia = Literal["prefill", "decode"]
DEFAULT_MAX_MIGRATIONS = 3


@dataclass(frozen=True)
class MigrationPolicy:
    """`max_migrations` resumes per request at most; `resume_via` says who recomputes the KV (README)."""

    max_migrations: int = DEFAULT_MAX_MIGRATIONS
    resume_via: ResumeVia = "prefill"


@dataclass(frozen=True)
class Migrate:
    reason: str  # worker_lost | draining | stalled: the label of kvrelay_router_migrations_total


@dataclass(frozen=True)
class GiveUp:
    error: OpenAIError
    limit_reached: bool  # counted in kvrelay_router_migration_failures_total{reason="limit"}


def decide(failure: WorkerFailed, migrations_done: int, policy: MigrationPolicy) -> Migrate | GiveUp:
    """Migrate when the worker (not the request) failed and the request has migrations left."""
    if failure.reason is None:
        # The worker refused this request (bad input, KV transfer failed under policy `fail`): another
        # worker would refuse it too, or the operator asked for an error instead of a recompute.
        code = "kv_transfer_failed" if "KV transfer failed" in str(failure) else "decode_failed"
        return GiveUp(server_error(str(failure), code=code), limit_reached=False)
    if migrations_done >= policy.max_migrations:
        message = (
            f"the request lost its decode worker {migrations_done + 1} times, over the limit of "
            f"{policy.max_migrations} migration(s); last failure: {failure}"
        )
        return GiveUp(server_error(message, code="migration_limit_exceeded"), limit_reached=True)
    return Migrate(failure.reason)


def no_decode_worker(migrations_done: int, last_failure: str | None) -> OpenAIError:
    """No healthy decode worker is left to start or resume the request on."""
    if last_failure is None:
        return server_error("no ready decode worker", code="no_decode_worker", status=503)
    message = (
        f"no ready decode worker to resume the request on after {migrations_done} migration(s); "
        f"last failure: {last_failure}"
    )
    return server_error(message, code="no_decode_worker", status=503)
