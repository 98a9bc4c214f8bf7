"""Any public request trace as a replayable `Trace`: the formats the field publishes, detected from
their columns (`autoscaler_replay.py --trace-file`).

- Azure LLM inference 2023/2024 (Splitwise, DynamoLLM), CSV: `TIMESTAMP` (a date-time),
  `ContextTokens`, `GeneratedTokens`.
- Mooncake FAST'25 (conversation, toolagent, synthetic), JSONL: `timestamp` (ms), `input_length`,
  `output_length`.
- BurstGPT, CSV: `Timestamp` (s), `Request tokens`, `Response tokens`.
- kvrelay's reduced Mooncake (bench/traces), CSV: `timestamp_ms`, `input_length`, `output_length`.
- plain, CSV or JSONL: `arrival_seconds`, `prompt_tokens`, `output_tokens`.

Arrivals are shifted to start at 0 and sorted. A request that generated nothing (a failed one in
BurstGPT) still costs its prefill: it is replayed with one output token. A row without a prompt
token is no request a server would take: it is counted and left out, and the count is in every
line of the replay. A field that is not a number (or a negative count) is an error naming the file
and row: the replay is of the trace as published or of nothing.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sim.traces import Request, Trace, superpose


@dataclass(frozen=True)
class TraceFormat:
    """Where one published format keeps arrival time and token counts."""

    name: str
    arrival: str
    prompt: str
    output: str
    units_per_second: float | None  # None: an ISO date-time string


FORMATS = (
    TraceFormat("azure", "TIMESTAMP", "ContextTokens", "GeneratedTokens", None),
    TraceFormat("mooncake", "timestamp", "input_length", "output_length", 1000.0),
    TraceFormat("burstgpt", "Timestamp", "Request tokens", "Response tokens", 1.0),
    TraceFormat("kvrelay", "timestamp_ms", "input_length", "output_length", 1000.0),
    TraceFormat("plain", "arrival_seconds", "prompt_tokens", "output_tokens", 1.0),
)


class TraceFileError(ValueError):
    """A trace file this reader cannot replay, with the reason."""


def detect_format(columns: set[str]) -> TraceFormat:
    """The published format whose three columns `columns` has, or an error listing the known ones."""
    for fmt in FORMATS:
        if {fmt.arrival, fmt.prompt, fmt.output} <= columns:
            return fmt
    known = "; ".join(f"{f.name}: {f.arrival}, {f.prompt}, {f.output}" for f in FORMATS)
    raise TraceFileError(f"columns {sorted(columns)} match no known trace format ({known})")


@dataclass(frozen=True)
class TraceFile:
    """A trace file as read: the trace, its format's name, and the rows it could not replay."""

    trace: Trace
    format: str
    rows_without_prompt: int


def load_trace_file(
    path: Path, copies: int = 1, seed: int = 0, limit_seconds: float | None = None, name: str | None = None
) -> TraceFile:
    """The trace in `path`: its first `limit_seconds` from its first row, `copies` jittered copies
    superposed, named `name` (default: the file's stem and the copies). Rows without a prompt token
    are counted, not replayed (BurstGPT has some)."""
    if copies < 1:
        raise TraceFileError(f"copies must be >= 1, got {copies}")
    fmt: TraceFormat | None = None
    first: datetime | float | None = None
    requests: list[Request] = []
    skipped = 0
    for line, record in _records(path):
        fmt = fmt or detect_format(set(record))
        arrival, prompt, output = _row(path, line, record, fmt)
        first = arrival if first is None else first
        at = _seconds_after(arrival, first, fmt)
        if limit_seconds is not None and at > limit_seconds:
            continue
        if prompt < 1:
            skipped += 1
            continue
        requests.append((at, prompt, output))
    if fmt is None or not requests:
        raise TraceFileError(f"{path}: no requests to replay ({skipped} rows without a prompt token)")
    start = min(at for at, _, _ in requests)
    shifted = sorted((at - start, p, o) for at, p, o in requests)
    name = name or f"{path.name.split('.')[0]}_x{copies}"
    return TraceFile(Trace(name, superpose(shifted, copies, seed)), fmt.name, skipped)


def load_azure_conv(
    path: Path, copies: int = 1, seed: int = 0, limit_seconds: float | None = None, kind: str = "conv"
) -> Trace:
    """Azure LLM inference trace 2023 (`kind` conv or code), as the built-in replay names it."""
    return load_trace_file(path, copies, seed, limit_seconds, name=f"azure_{kind}_x{copies}").trace


def load_mooncake(path: Path, copies: int = 1, seed: int = 0) -> Trace:
    """Mooncake FAST'25 synthetic trace, as the built-in replay names it."""
    return load_trace_file(path, copies, seed, name=f"mooncake_x{copies}").trace


def load_mooncake_conversation(path: Path, copies: int = 1, seed: int = 0) -> Trace:
    """Mooncake FAST'25 conversation trace, reduced to `timestamp_ms,input_length,output_length`
    (bench/traces/README.md), as the built-in replay names it."""
    return load_trace_file(path, copies, seed, name=f"mooncake_conversation_x{copies}").trace


def _records(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    """(line number, record) per request: JSON objects one per line, or CSV rows under a header."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM is no part of a column name
        first = f.readline()
        f.seek(0)
        if first.lstrip().startswith("{"):
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TraceFileError(f"{path}:{number}: not JSON ({e.msg})") from e
                    if not isinstance(record, dict):
                        raise TraceFileError(f"{path}:{number}: not a JSON object")
                    yield number, record
            return
        for number, row in enumerate(csv.DictReader(f), start=2):
            yield number, row


def _row(
    path: Path, line: int, record: Mapping[str, object], fmt: TraceFormat
) -> tuple[datetime | float, int, int]:
    """(arrival as written, prompt tokens, output tokens, at least one) of one row."""

    def number(column: str) -> float:
        value = record.get(column)
        try:
            parsed = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            parsed = math.nan
        if not math.isfinite(parsed):
            raise TraceFileError(f"{path}:{line}: {column}={value!r} is not a number")
        return parsed

    arrival: datetime | float
    if fmt.units_per_second is None:
        stamp = str(record.get(fmt.arrival, ""))
        try:
            # Azure writes 7 fractional digits; Python reads at most 6.
            when = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp.strip()))
        except ValueError:
            raise TraceFileError(f"{path}:{line}: {fmt.arrival}={stamp!r} is not a date-time") from None
        arrival = when if when.tzinfo else when.replace(tzinfo=UTC)  # no zone: UTC, no DST
    else:
        arrival = number(fmt.arrival)
    prompt, output = number(fmt.prompt), number(fmt.output)
    if prompt < 0 or output < 0:
        counts = f"{fmt.prompt}={prompt:g}, {fmt.output}={output:g}"
        raise TraceFileError(f"{path}:{line}: a negative token count ({counts})")
    return arrival, int(prompt), max(int(output), 1)


def _seconds_after(arrival: datetime | float, first: datetime | float, fmt: TraceFormat) -> float:
    if isinstance(arrival, datetime) and isinstance(first, datetime):
        return (arrival - first).total_seconds()
    assert fmt.units_per_second is not None and isinstance(arrival, float) and isinstance(first, float)
    return (arrival - first) / fmt.units_per_second
