"""kvrelay's autoscaler on other jitterings of the real traces: how much of a replay's figure is the draw.

`autoscaler_replay.py` superposes ten copies of an Azure trace, each shifted by a seeded jitter, and
replays one draw (seed 0). A policy's decisions at a burst can tip where its turns go, so one draw may
flatter or wrong it. This replays kvrelay and the smallest static deployment that meets 99% (the
baseline, searched per draw as in the replay) on other draws of the same traces, and prints one JSON
line per trace: per draw and as median / min / max, kvrelay's in-SLO share, GPU-hours and their ratio
to the static baseline of the same draw, and how many draws fall below 99% in SLO.

    python bench/autoscaler_seeds.py [--seeds 1,2,3,4,5,6] [--trace azure_code] [--minutes M]

About 2 min of CPU per trace and 6 draws on 2 cores. Traces: `../shared/traces` (Azure conversation)
and `bench/traces` (Azure code); see their READMEs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from autoscaler_replay import AZURE_COPIES, _initial, _smallest_static_peak  # noqa: E402
from sim.controllers import KvrelayController  # noqa: E402
from sim.model import ReplicaModel  # noqa: E402
from sim.replay import Scenario, run, static_sizes  # noqa: E402
from sim.trace_file import load_azure_conv  # noqa: E402
from sim.traces import traces_dir  # noqa: E402

# The replay's chat SLOs (autoscaler_replay.scenarios): both Azure traces are replayed with them.
CHAT_SLOS = {"ttft_slo_seconds": 1.5, "itl_slo_seconds": 0.030}


def trace_paths() -> dict[str, tuple[Path, str]]:
    """Trace name -> (CSV, kind) for the jittered real traces."""
    return {
        f"azure_conv_x{AZURE_COPIES}": (
            traces_dir(BENCH_DIR.parent) / "AzureLLMInferenceTrace_conv.csv",
            "conv",
        ),
        f"azure_code_x{AZURE_COPIES}": (BENCH_DIR / "traces" / "AzureLLMInferenceTrace_code.csv", "code"),
    }


def one_draw(name: str, seed: int, minutes: float | None) -> dict[str, float]:
    """kvrelay and the smallest 99% static on one draw of `name`."""
    path, kind = trace_paths()[name]
    limit = None if minutes is None else minutes * 60.0
    trace = load_azure_conv(path, copies=AZURE_COPIES, seed=seed, limit_seconds=limit, kind=kind)
    scenario = Scenario(trace=trace, model=ReplicaModel(), real=True, **CHAT_SLOS)
    kvrelay = run(scenario, KvrelayController(scenario.policy_config()), _initial(trace, scenario))
    static = _smallest_static_peak(scenario, static_sizes(scenario, "peak"))
    return {
        "seed": seed,
        "slo_attainment": float(kvrelay["slo_attainment"]),
        "gpu_hours": float(kvrelay["gpu_hours"]),
        "static_gpu_hours": float(static["gpu_hours"]),  # type: ignore[arg-type]
        "static_slo_attainment": float(static["slo_attainment"]),  # type: ignore[arg-type]
        "gpu_hours_vs_static": round(float(kvrelay["gpu_hours"]) / float(static["gpu_hours"]), 3),  # type: ignore[arg-type]
    }


def summarize(name: str, draws: list[dict[str, float]]) -> dict[str, object]:
    """One JSON line: the draws, and median / min / max of each figure across them."""
    line: dict[str, object] = {
        "bench": "autoscaler_seeds",
        "trace": name,
        "policy": "kvrelay",
        "draws": draws,
    }
    for key in ("slo_attainment", "gpu_hours", "gpu_hours_vs_static"):
        values = [d[key] for d in draws]
        line[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    line["draws_below_99"] = sum(d["slo_attainment"] < 0.99 for d in draws)
    return line


def main(argv: list[str] | None = None) -> int:
    """Replay every draw and print one JSON line per trace."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", default="1,2,3,4,5,6", help="jitter seeds, comma-separated (0 is the replay's)"
    )
    parser.add_argument("--trace", action="append", help="only traces whose name contains this")
    parser.add_argument("--minutes", type=float, help="replay only the first M minutes of each trace (tests)")
    parser.add_argument("--jobs", type=int, default=2, help="draws replayed at once")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [n for n in trace_paths() if not args.trace or any(t in n for t in args.trace)]
    jobs = [(name, seed) for name in names for seed in seeds]
    with ProcessPoolExecutor(max(args.jobs, 1)) as pool:
        futures = {job: pool.submit(one_draw, *job, args.minutes) for job in jobs}
        for name in names:
            draws = [futures[(name, seed)].result() for seed in seeds]
            print(json.dumps(summarize(name, draws)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
