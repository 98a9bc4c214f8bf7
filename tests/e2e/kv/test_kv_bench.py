"""`bench/kv_transfer.py` end to end (smallest run): the relay between two processes moves the
right bytes and releases them, and every figure the README quotes is printed. No timing is
asserted: figures are for the benchmark, not for tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_kv_transfer_bench_prints_verified_figures() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "kv_transfer.py"), "--iters", "1", "--rounds", "1",
         "--flavours", "nixl-cma,tcp"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert (line["bench"], line["rounds"]) == ("kv_transfer", 1)
    assert line["cores"] >= 1 and line["llc_bytes"] > 0
    threads = sorted({"1", str(line["cores"])})
    for flavour, ratio in (("nixl-cma", "ratio_vs_memcpy"), ("tcp", "ratio_vs_socket")):
        for tokens, nbytes in (("2048", 256 << 20), ("128", 16 << 20)):
            entry = line[flavour][tokens]
            assert entry["bytes"] == nbytes, (flavour, tokens)
            assert entry["verified"] and entry["released"], (flavour, tokens)
            assert entry["relay_s"] > 0 and entry["socket_s"] > 0 and entry["memcpy_s"] > 0
            assert entry[ratio] > 0 and f"{ratio}_rounds" not in entry  # one round: no median taken
            # the copy limit: 1 and N threads, idle and beside the relay; memcpy_s is the fastest
            for where in ("memcpy_idle_gbps", "memcpy_beside_gbps"):
                assert sorted(entry[where]) == threads and min(entry[where].values()) > 0, (flavour, where)
            best = max(*entry["memcpy_idle_gbps"].values(), *entry["memcpy_beside_gbps"].values())
            assert abs(entry["memcpy_gbps"] - best) <= 0.002 * best + 0.002, (flavour, tokens)
    for tokens in ("2048", "128"):
        entry = line["nixl-cma"][tokens]
        assert entry["bare_nixl_s"] > 0 and entry["bare_runs_s"] > 0, tokens
        assert entry["bare_runs_ratio_vs_memcpy"] > 0, tokens


def test_several_rounds_report_the_median_round_and_every_ratio() -> None:
    """`--rounds N` (fresh processes each) keeps the median round by ratio and lists every round's."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from kv_transfer import summarize

    def round_(relay_s: float, ok: bool = True) -> dict[str, object]:
        return {"relay_s": relay_s, "memcpy_s": 1.0, "socket_s": 2.0, "verified": ok, "released": True}

    out = summarize([round_(4.0), round_(1.0), round_(2.0, ok=False)], "nixl-cma")
    assert out["ratio_vs_memcpy_rounds"] == [0.25, 1.0, 0.5]
    assert out["ratio_vs_memcpy"] == 0.5 and out["relay_s"] == 2.0  # the median round's own figures
    assert out["verified"] is False  # one unverified round spoils the lot
