"""Engine overhead: one decode step (scheduler + paged KV cache + sampling) vs a bare model forward.

The baseline is the same model with a plain contiguous KV cache ([B, H, T, D] per layer), the same
batch and context lengths, plus LM head and argmax. Prints one JSON line:
{"bench": "engine_overhead", "batches": {"1": {"engine_ms": .., "bare_ms": .., "ratio": ..}, ...}}

    python bench/engine_overhead.py [--model DIR] [--batches 1 16 64] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams
from kvrelay_worker.model import load_model
from kvrelay_worker.model.attention import DenseKVCacheAttention
from kvrelay_worker.model.tiny import make_tiny_model


class EngineDecode:
    """B requests prefilled in the engine; ``step()`` runs one decode step of the whole batch."""

    def __init__(self, model, batch: int, prompts: list[list[int]], steps: int, block_size: int) -> None:
        total = len(prompts[0]) + steps + 16
        cfg = EngineConfig(
            num_blocks=batch * (-(-total // block_size)) + 1,
            block_size=block_size,
            max_num_seqs=batch,
            max_batch_tokens=batch * len(prompts[0]),
        )
        self.engine = Engine(model, cfg)
        params = SamplingParams(max_tokens=steps + 16, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            self.engine.add_request(str(i), prompt, params, now=0.0)
        self.engine.step(now=0.0)  # all prompts in one prefill step
        self.batch = batch

    def step(self) -> None:
        result = self.engine.step(now=0.0)
        assert len(result.outputs) == self.batch


class BareDecode:
    """The same model and prompts with a plain contiguous KV cache; ``step()`` = forward + argmax."""

    @torch.inference_mode()
    def __init__(self, model, batch: int, prompts: list[list[int]], steps: int) -> None:
        cfg, n = model.config, len(prompts[0])
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.attn = DenseKVCacheAttention(
            cfg.num_hidden_layers,
            batch,
            cfg.num_key_value_heads,
            cfg.head_dim,
            n + steps + 16,
            param.dtype,
            param.device,
        )
        self.attn.begin(n)
        ids = torch.tensor(prompts, device=self.device).reshape(-1)
        hidden = model(ids, torch.arange(n, device=self.device).repeat(batch), self.attn)
        self.attn.end()
        self.tokens = model.compute_logits(hidden.view(batch, n, -1)[:, -1]).argmax(-1)
        self.batch = batch

    @torch.inference_mode()
    def step(self) -> None:
        self.attn.begin(1)
        pos = torch.full((self.batch,), self.attn.length, dtype=torch.long, device=self.device)
        hidden = self.model(self.tokens, pos, self.attn)
        self.attn.end()
        self.tokens = self.model.compute_logits(hidden).argmax(-1)
        self.tokens.tolist()  # the engine hands tokens back to Python too


def interleaved_step_times(
    model, batch: int, prompts: list[list[int]], steps: int, block_size: int
) -> tuple[list[float], list[float]]:
    """Seconds per decode step (engine, bare), alternating the two so host noise hits both alike."""
    eng = EngineDecode(model, batch, prompts, steps, block_size)
    bare = BareDecode(model, batch, prompts, steps)
    for _ in range(3):  # warm-up
        eng.step()
        bare.step()
    e_times, b_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        t1 = time.perf_counter()
        bare.step()
        t2 = time.perf_counter()
        e_times.append(t1 - t0)
        b_times.append(t2 - t1)
    for i in range(batch):
        eng.engine.abort(str(i))
    return e_times, b_times


def measure(model, batch: int, prompt_len: int, steps: int, block_size: int) -> dict[str, float]:
    """Step times (ms): medians, and minima (robust on a shared host); engine and bare steps
    alternate so host noise hits both alike."""
    prompts = [[(7 * i + j) % 500 + 5 for j in range(prompt_len)] for i in range(batch)]
    e_times, b_times = interleaved_step_times(model, batch, prompts, steps, block_size)
    e, b = statistics.median(e_times) * 1e3, statistics.median(b_times) * 1e3
    e_min, b_min = min(e_times) * 1e3, min(b_times) * 1e3
    return {
        "engine_ms": round(e, 3),
        "bare_ms": round(b, 3),
        "ratio": round(e / b, 3),
        "engine_min_ms": round(e_min, 3),
        "bare_min_ms": round(b_min, 3),
        "ratio_min": round(e_min / b_min, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint dir (default: a fresh tiny model)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or make_tiny_model(tempfile.mkdtemp(prefix="kvrelay-bench-"))
    model = load_model(
        model_dir, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None
    )
    results = {}
    for batch in args.batches:
        results[str(batch)] = measure(model, batch, args.prompt_len, args.steps, args.block_size)
    print(
        json.dumps(
            {
                "bench": "engine_overhead",
                "model": str(model_dir),
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "threads": args.threads,
                "prompt_len": args.prompt_len,
                "batches": results,
                "target_ratio": 1.25,
            }
        )
    )


if __name__ == "__main__":
    main()
