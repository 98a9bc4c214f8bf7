"""`bench/prefix_cache.py` end to end on a small window: the settings run on real stacks, the figures
are consistent, and the bound is computed from the window itself. No latency is asserted: figures
are for the benchmark, not for tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "bench"))
from prefix_cache import TraceRequest, chat_prompts, ideal_hit_rate, trace_prompts  # noqa: E402


def test_the_bound_is_the_longest_seen_prefix_of_each_request() -> None:
    requests = [
        TraceRequest(0.0, (1, 2, 3), 1),  # cold: nothing
        TraceRequest(0.1, (1, 2, 4), 1),  # 2 of 3
        TraceRequest(0.2, (1, 2, 3), 1),  # all 3, or 2 when the last block is always computed
        TraceRequest(0.3, (9, 2, 3), 1),  # a known id after an unknown one is other KV: nothing
    ]
    prompts = trace_prompts(requests, 16)
    assert ideal_hit_rate(prompts, 16, last_block_computed=False) == pytest.approx(5 / 12)
    assert ideal_hit_rate(prompts, 16, last_block_computed=True) == pytest.approx(4 / 12)
    # token prompts: the same rule over their block hashes, counted in tokens (a partial block never hits)
    system = list(range(100, 132))  # 2 blocks
    chat = chat_prompts([[*system, 1, 2], [*system, 1, 2, 3, 4], [*system]], 16)
    # 0 of 34, then 32 of 36, then 16 of 32 (the second block holds the last token)
    assert ideal_hit_rate(chat, 16) == pytest.approx((32 + 16) / (34 + 36 + 32))


def test_small_window_with_prefix_aware_routing_and_multi_turn() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "prefix_cache.py"), "--window", "40", "--speedup", "16",
         "--settings", "c,multi", "--conversations", "2", "--turns", "3", "--num-blocks", "4096",
         "--stagger-s", "0.1", "--think-s", "0.1"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT / "bench",
    )  # fmt: skip
    lines = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    assert proc.returncode == 0 and len(lines) == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    trace, chat = lines
    assert trace["setting"] == "c" and trace["requests"] == 40 and trace["failed"] == 0, trace
    assert trace["window"]["rows"] == "0-39" and 0 <= trace["window"]["ideal_hit_rate"] <= 1
    assert trace["hit_rate"] <= trace["window"]["ideal_hit_rate_last_block_computed"] + 1e-9, trace
    assert trace["prefill_tokens_computed"] > 0 and trace["ttft"]["p50_ms"] > 0
    assert chat["setting"] == "multi" and chat["requests"] == 6 and chat["failed"] == 0, chat
    # turns 2 and 3 resend the whole history: most of their prompt is cached on the worker it went to
    assert 0.3 < chat["hit_rate"] <= chat["ideal_hit_rate_last_block_computed"] + 1e-9, chat
    # the decode worker held each conversation's last turn: the relay moved only the new tail
    assert chat["decode_hit_rate"] > 0.3 and chat["kv_bytes_relayed"] > 0, chat
