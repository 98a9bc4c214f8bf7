"""Append-only record of decisions with the snapshot they came from, for audit and offline replay.

Each line is one JSON object {"object", "snapshot", "decision"}; `replay` feeds the snapshots back
through `policy.decide` (same config) so a production incident can be re-run on a laptop.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from kvrelay_operator.autoscaler.policy import decide
from kvrelay_operator.autoscaler.types import Decision, PolicyConfig, PolicyState, Snapshot


class LogEntry(BaseModel):
    """One decision and what it saw."""

    model_config = ConfigDict(frozen=True)

    object: str
    snapshot: Snapshot
    decision: Decision


class DecisionLog:
    """Keeps the last `keep` entries in memory and, when `path` is set, appends them as JSON lines."""

    def __init__(self, path: Path | None = None, keep: int = 256) -> None:
        self.path = path
        self.entries: deque[LogEntry] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def record(self, obj: str, snapshot: Snapshot, decision: Decision) -> LogEntry:
        """Remember one decision (thread-safe: kopf runs timers of several objects concurrently)."""
        entry = LogEntry(object=obj, snapshot=snapshot, decision=decision)
        with self._lock:
            self.entries.append(entry)
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(entry.model_dump_json() + "\n")
        return entry


def read_log(path: Path) -> list[LogEntry]:
    """Entries of a JSON-lines decision log."""
    return [
        LogEntry.model_validate(json.loads(line)) for line in path.read_text().splitlines() if line.strip()
    ]


def replay(entries: Iterable[LogEntry], config: PolicyConfig) -> list[Decision]:
    """Decide again from the logged snapshots, at the logged times, with `config`."""
    state = PolicyState()
    out = []
    for entry in entries:
        decision, state = decide(entry.snapshot, state, config, entry.decision.at)
        out.append(decision)
    return out
