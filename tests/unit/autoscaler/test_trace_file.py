"""`bench/autoscaler_replay.py --trace-file`: public traces in the formats the field publishes (Azure
2023 and 2024, Mooncake, BurstGPT, plain) replayed against every policy, and malformed ones refused
with the file and row named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "bench"))

from sim.trace_file import TraceFileError, load_azure_conv, load_mooncake_conversation, load_trace_file  # noqa: E402

AZURE_2023 = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:46.6805900,374,44
"""
AZURE_2024 = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 00:00:00.009930+00:00,4808,10
2024-05-10 00:00:01+00:00,3180,8
"""
MOONCAKE = '{"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1]}\n' + (
    '{"timestamp": 1500, "input_length": 6472, "output_length": 26, "hash_ids": [0, 2]}\n'
)
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
7,ChatGPT,0,20,20,Conversation log
45,GPT-4,1087,0,1087,API log
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text", "fmt", "requests", "skipped"),
    [
        # Sorted, shifted to 0; 7 fractional digits read.
        ("azure.csv", AZURE_2023, "azure", [(0.0, 374, 44), (4.314579, 396, 109)], 0),
        ("azure24.csv", AZURE_2024, "azure", [(0.0, 4808, 10), (0.99007, 3180, 8)], 0),
        ("mooncake.jsonl", MOONCAKE, "mooncake", [(0.0, 6955, 52), (1.5, 6472, 26)], 0),
        # No prompt: left out and counted; nothing generated: one output token (its prefill still ran).
        ("burst.csv", BURSTGPT, "burstgpt", [(0.0, 472, 18), (40.0, 1087, 1)], 1),
    ],
)
def test_each_published_format_reads_as_requests(
    tmp_path: Path, name: str, text: str, fmt: str, requests: list[tuple[float, int, int]], skipped: int
) -> None:
    read = load_trace_file(_write(tmp_path, name, text))
    assert read.format == fmt
    assert read.rows_without_prompt == skipped
    assert [(round(at, 6), p, o) for at, p, o in read.trace.requests] == requests


@pytest.mark.parametrize(
    ("load", "name", "count", "prompt", "output", "last"),
    [
        # Figures of the loaders the replay used before this reader (results-full.jsonl's traces).
        (lambda p: load_azure_conv(p / "AzureLLMInferenceTrace_code.csv", kind="code"), "azure_code_x1",
         8819, 18_059_974, 245_896, 3435.948056),
        (lambda p: load_mooncake_conversation(p / "mooncake_conversation_trace.csv"),
         "mooncake_conversation_x1", 12031, 144_793_823, 4_122_048, 3536.999),
    ],
)  # fmt: skip
def test_the_recorded_traces_read_as_the_replay_has_always_read_them(
    load: Any, name: str, count: int, prompt: int, output: int, last: float
) -> None:
    trace = load(REPO_ROOT / "bench" / "traces")
    assert trace.name == name and len(trace.requests) == count
    assert sum(r[1] for r in trace.requests) == prompt and sum(r[2] for r in trace.requests) == output
    assert trace.requests[0][0] == 0.0 and trace.requests[-1][0] == pytest.approx(last, abs=1e-6)


def test_minutes_keep_the_start_of_the_trace(tmp_path: Path) -> None:
    path = _write(tmp_path, "burst.csv", BURSTGPT)
    assert [r[1] for r in load_trace_file(path, limit_seconds=30.0).trace.requests] == [472]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time,prompt,output\n1,2,3\n", "match no known trace format"),
        (
            "arrival_seconds,prompt_tokens,output_tokens\n0,10,5\n1,ten,5\n",
            ":3: prompt_tokens='ten' is not a number",
        ),
        ("arrival_seconds,prompt_tokens,output_tokens\n0,10,-5\n", ":2: a negative token count"),
        (
            "arrival_seconds,prompt_tokens,output_tokens\nnan,10,5\n",
            ":2: arrival_seconds='nan' is not a number",
        ),
        ("arrival_seconds,prompt_tokens,output_tokens\n0,inf,5\n", ":2: prompt_tokens='inf' is not a number"),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,5\n",
            ":2: TIMESTAMP='yesterday' is not a date-time",
        ),
        ('{"arrival_seconds": 0, "prompt_tokens": 3, "output_tokens": 1}\n[1, 2]\n', ":2: not a JSON object"),
        (
            "arrival_seconds,prompt_tokens,output_tokens\n0,0,5\n",
            "no requests to replay (1 rows without a prompt",
        ),
    ],
)
def test_a_malformed_trace_is_refused_naming_the_row(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TraceFileError, match=None) as error:
        load_trace_file(_write(tmp_path, "bad.csv", text))
    assert message in str(error.value)


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "autoscaler_replay.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip


def test_a_trace_file_is_replayed_against_every_policy(tmp_path: Path) -> None:
    # Five minutes of a plain JSONL trace: 8 requests a second of 1,000-token prompts, one without a prompt.
    lines = [
        json.dumps({"arrival_seconds": i / 8, "prompt_tokens": 1000 + (i * 37) % 400, "output_tokens": 100})
        for i in range(8 * 300)
    ]
    lines.append(json.dumps({"arrival_seconds": 12.0, "prompt_tokens": 0, "output_tokens": 3}))
    path = _write(tmp_path, "mine.jsonl", "\n".join(lines) + "\n")
    proc = _replay("--trace-file", str(path), "--copies", "2", "--itl-slo", "0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {line["policy"]: line for line in map(json.loads, proc.stdout.splitlines())}
    assert {"static_peak", "hpa", "sla_planner", "dynamo_load", "kvrelay"} <= set(results)
    kv = results["kvrelay"]
    assert kv["trace"] == "mine_x2" and kv["trace_format"] == "plain" and kv["copies"] == 2
    assert kv["requests"] == 2 * 8 * 300 and kv["rows_without_prompt"] == 1
    # Chat-length prompts: the chat TTFT SLO by default; the ITL SLO as given.
    assert kv["ttft_slo_seconds"] == 1.5 and kv["itl_slo_seconds"] == 0.05
    assert 0 < float(kv["slo_attainment"]) <= 1 and float(kv["gpu_hours"]) > 0


def test_a_bad_trace_file_is_a_usage_error(tmp_path: Path) -> None:
    proc = _replay("--trace-file", str(_write(tmp_path, "bad.csv", "a,b\n1,2\n")))
    assert proc.returncode == 2 and "match no known trace format" in proc.stderr
    proc = _replay("--trace-file", str(tmp_path / "missing.csv"))
    assert proc.returncode == 2 and "missing.csv" in proc.stderr
