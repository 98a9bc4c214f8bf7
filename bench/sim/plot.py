"""One picture per replayed trace: offered load, replicas per role for every policy, and the rolling
in-SLO share, on one time axis (matplotlib, written as PNG)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sim.replay import Timeline
from sim.traces import Trace

BIN_SECONDS = 60.0  # load and in-SLO share per minute
ROLLING_BINS = 5  # the in-SLO share is over the last 5 minutes of arrivals


def _per_bin(times: list[float], values: list[float], end: float) -> np.ndarray:
    bins = int(np.ceil(end / BIN_SECONDS)) or 1
    out = np.zeros(bins)
    np.add.at(out, np.minimum((np.asarray(times) // BIN_SECONDS).astype(int), bins - 1), values)
    return out


def plot_trace(path: Path, trace: Trace, timelines: Mapping[str, Timeline], title: str = "") -> Path:
    """Write ``path`` (PNG): three panels sharing the x axis, minutes since the trace's start."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    end = trace.duration_seconds
    arrivals = [r[0] for r in trace.requests]
    rate = _per_bin(arrivals, [1.0] * len(arrivals), end) / BIN_SECONDS
    tokens = _per_bin(arrivals, [float(r[1]) for r in trace.requests], end) / BIN_SECONDS / 1000.0
    minutes = np.arange(len(rate)) * BIN_SECONDS / 60.0
    fig, (load, reps, slo) = plt.subplots(3, 1, sharex=True, figsize=(11, 8.5), height_ratios=[1, 2, 1.2])
    load.plot(minutes, rate, color="black", label="requests/s")
    load.set_ylabel("requests/s")
    twin = load.twinx()
    twin.plot(minutes, tokens, color="grey", linestyle=":", label="prompt ktokens/s")
    twin.set_ylabel("prompt ktok/s")
    load.set_title(title or f"{trace.name}: offered load, replicas and in-SLO share per policy")
    colors = matplotlib.colormaps["tab10"]
    for i, (policy, tl) in enumerate(timelines.items()):
        color = colors(i % 10)
        t = np.asarray(tl.times) / 60.0
        width = 2.2 if policy == "kvrelay" else 1.2
        reps.step(
            t, tl.replicas["prefill"], where="post", color=color, linewidth=width, label=f"{policy} prefill"
        )
        reps.step(t, tl.replicas["decode"], where="post", color=color, linewidth=width, linestyle="--",
                  label=f"{policy} decode")  # fmt: skip
        total = _per_bin(tl.arrivals, [1.0] * len(tl.arrivals), end)
        good = _per_bin(tl.arrivals, [float(ok) for ok in tl.in_slo], end)
        kernel = np.ones(ROLLING_BINS)
        share = np.convolve(good, kernel)[: len(good)] / np.maximum(
            np.convolve(total, kernel)[: len(total)], 1
        )
        slo.plot(minutes[: len(share)], share * 100.0, color=color, linewidth=width, label=policy)
    reps.set_ylabel("replicas (solid prefill, dashed decode)")
    reps.legend(fontsize=7, ncol=3, loc="upper left")
    slo.axhline(99.0, color="red", linewidth=0.8, linestyle=":")
    slo.set_ylabel(f"in-SLO %, last {ROLLING_BINS} min")
    slo.set_ylim(max(0.0, slo.get_ylim()[0]), 101)
    slo.set_xlabel("minutes")
    slo.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
