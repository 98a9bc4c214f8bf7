"""Prefill and decode tokens/s of the engine on this host, tiny and ~100M-parameter random checkpoints.

Baseline in the same run: the bare model (no scheduler, contiguous KV cache) on the same work.
Prints one JSON line: {"bench": "engine_throughput", "models": {"tiny": {...}, "100m": {...}}}

    python bench/engine_throughput.py [--sizes tiny 100m] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_overhead import interleaved_step_times
from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams
from kvrelay_worker.model import load_model
from kvrelay_worker.model.attention import DenseCausalAttention
from kvrelay_worker.model.tiny import make_tiny_model

WORK = {  # prompts x prompt_len for prefill; batch x steps for decode
    "tiny": {"prefill": (8, 512), "decode": (16, 64), "repeats": 3},
    "100m": {"prefill": (2, 256), "decode": (8, 16), "repeats": 2},
    "1b": {"prefill": (2, 512), "decode": (16, 32), "repeats": 2},
}


def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[(31 * i + 7 * j) % (vocab - 10) + 5 for j in range(length)] for i in range(n)]


def engine_prefill_s(model, prompts: list[list[int]], block_size: int = 16) -> float:
    n, length = len(prompts), len(prompts[0])
    blocks = n * (-(-(length + 1) // block_size)) + 1
    engine = Engine(model, EngineConfig(num_blocks=blocks, block_size=block_size, max_batch_tokens=length))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=2), now=0.0, prefill_only=True)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step(now=0.0)
    elapsed = time.perf_counter() - t0
    for i in range(n):
        engine.release(str(i))
    return elapsed


@torch.inference_mode()
def bare_prefill_s(model, prompts: list[list[int]]) -> float:
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    for p in prompts:
        ids, pos = torch.tensor(p, device=dev), torch.arange(len(p), device=dev)
        hidden = model(ids, pos, DenseCausalAttention(1, len(p)))
        model.compute_logits(hidden[-1:]).argmax(-1).tolist()
    return time.perf_counter() - t0


def decode_tok_s(model, batch: int, steps: int) -> tuple[float, float]:
    prompts = prompts_for(batch, 32, model.config.vocab_size)
    e_times, b_times = interleaved_step_times(model, batch, prompts, steps, 16)
    return batch / statistics.median(e_times), batch / statistics.median(b_times)


def run_size(size: str, device: str, dtype: torch.dtype | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"kvrelay-{size}-") as tmp:
        saved = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
        model_dir = make_tiny_model(tmp, size=size, dtype=saved)
        model = load_model(model_dir, device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    work = WORK[size]
    n, length = work["prefill"]
    prompts = prompts_for(n, length, model.config.vocab_size)
    pre_e, pre_b = [], []
    for _ in range(work["repeats"]):
        pre_e.append(n * length / engine_prefill_s(model, prompts))
        pre_b.append(n * length / bare_prefill_s(model, prompts))
    batch, steps = work["decode"]
    dec_e, dec_b = decode_tok_s(model, batch, steps)
    pe, pb = statistics.median(pre_e), statistics.median(pre_b)
    return {
        "params_m": round(params / 1e6, 1),
        "prefill_tok_s": round(pe, 1),
        "prefill_bare_tok_s": round(pb, 1),
        "prefill_ratio": round(pe / pb, 3),
        "prefill_work": f"{n}x{length}",
        "decode_tok_s": round(dec_e, 1),
        "decode_bare_tok_s": round(dec_b, 1),
        "decode_ratio": round(dec_e / dec_b, 3),
        "decode_batch": batch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=sorted(WORK))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    models = {size: run_size(size, args.device, dtype) for size in args.sizes}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        json.dumps({"bench": "engine_throughput", "device": name, "threads": args.threads, "models": models})
    )


if __name__ == "__main__":
    main()
