"""The price of reacting: the cheapest perfectly informed reactive schedule against the
clairvoyant-with-cold-start reference, per trace (bench/sim/reactive.py says what the family is).

Prints one JSON line per trace and lag: the reference replayed in the same run (its baseline),
the cheapest member of the family that meets 99% in both SLOs, its ratio to the reference, and
kvrelay's ratio from the same run for comparison.

    python bench/reactive_bound.py --reference-from bench/sim/results-full.jsonl [--trace NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from autoscaler_replay import REFERENCE, _expand, _initial, _run_length, scenarios  # noqa: E402
from sim.controllers import KvrelayController  # noqa: E402
from sim.reactive import LAGS, NAME, minute_needs, reactive_schedule, search_reactive  # noqa: E402
from sim.reference import ScheduleController  # noqa: E402
from sim.replay import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Search the reactive family on every trace with a recorded reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-from", type=Path, required=True, metavar="JSONL")
    parser.add_argument("--trace", action="append", help="only traces whose name contains this")
    parser.add_argument("--lag", type=int, action="append", choices=LAGS, help="only these lags")
    parser.add_argument(
        "--start",
        action="append",
        choices=("reference", "dynamic"),
        help="only these starts (default both: the reference's own, and the dynamic policies')",
    )
    parser.add_argument("--verbose", action="store_true", help="log the search to stderr")
    args = parser.parse_args(argv)
    lines = [json.loads(x) for x in args.reference_from.read_text().splitlines() if x.strip()]
    references = {line["trace"]: line for line in lines if line["policy"] == REFERENCE}

    def log(text: str) -> None:
        if args.verbose:
            print(text, file=sys.stderr, flush=True)

    for scenario in scenarios(False, args.trace):
        earlier = references.get(scenario.trace.name)
        if earlier is None:
            print(f"{scenario.trace.name}: no reference in {args.reference_from}: skipped", file=sys.stderr)
            continue
        started = time.perf_counter()
        reference = _expand(earlier["schedule"], scenario)
        baseline = run(scenario, ScheduleController(REFERENCE, reference), reference[0])
        initial = _initial(scenario.trace, scenario)
        needs = minute_needs(scenario)
        kvrelay = run(scenario, KvrelayController(scenario.policy_config()), initial)
        ref_hours = float(baseline["gpu_hours"])  # type: ignore[arg-type]
        starts = {"dynamic": initial, "reference": reference[0]}
        for lag in args.lag or LAGS:
            # Started as the other policies start, and (generously) with the reference's own start.
            for start_name in args.start or list(starts):
                start = starts[start_name]
                found = search_reactive(scenario, needs, start, lag, log)
                out: dict[str, object] = {
                    "bench": "reactive_bound",
                    "trace": scenario.trace.name,
                    "real": scenario.real,
                    "lag_minutes": lag,
                    "start": start_name,
                    "initial": list(start),
                    "reference_gpu_hours": ref_hours,
                    "reference_slo_attainment": baseline["slo_attainment"],
                    "kvrelay_gpu_hours_vs_reference": round(float(kvrelay["gpu_hours"]) / ref_hours, 3),  # type: ignore[arg-type]
                    "kvrelay_slo_attainment": kvrelay["slo_attainment"],
                    "replays": found.replays,
                }
                if found.params is None or found.result is None:
                    out["policy"] = NAME
                    out["passes"] = False
                else:
                    line = found.result
                    schedule = reactive_schedule(needs, start, found.params, scenario)
                    out |= {
                        "policy": NAME,
                        "passes": True,
                        "hold_minutes": found.params.hold,
                        "prefill_margin": found.params.prefill_margin,
                        "decode_margin": found.params.decode_margin,
                        "slo_attainment": line["slo_attainment"],
                        "gpu_hours": line["gpu_hours"],
                        "gpu_hours_vs_reference": round(float(line["gpu_hours"]) / ref_hours, 3),  # type: ignore[arg-type]
                        "prefill_max_reversals_in_an_hour": line["prefill_max_reversals_in_an_hour"],
                        "decode_max_reversals_in_an_hour": line["decode_max_reversals_in_an_hour"],
                        "peak": [max(s[0] for s in schedule), max(s[1] for s in schedule)],
                        "schedule": _run_length(schedule),
                    }
                out["sim_wall_seconds"] = round(time.perf_counter() - started, 1)
                print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
