"""GPU check: kvrelay vs transformers on a random ~1B Llama built on the machine, tokens/s, roofline.

Needs no network and no checkpoint: the model is built here with transformers' own ``LlamaConfig``
and ``LlamaForCausalLM`` (fixed seed, default init, fp32), saved with ``save_pretrained``
(safetensors) and loaded with kvrelay's ``load_model``. Checks, one JSON line each:

- ``logits``: kvrelay vs transformers on the same token ids (prompts up to 1,100 tokens), full
  recompute, in bf16 and in fp32; fails when kvrelay bf16 is further from transformers bf16 than
  ``BF16_FACTOR`` x the distance of transformers bf16 from transformers fp32 (the bf16 noise).
- ``greedy``: 16 prompts x 64 new tokens, kvrelay's paged engine (batch 16 and batch 1) vs
  transformers ``generate(do_sample=False)`` in bf16, with near-tie accounting
  (shared/notes/token-equality.md).
- ``paged``: the paged engine (chunked prefill + decode, batch 16) vs a full recompute of the same
  kvrelay model on the engine's own tokens, in fp32 and bf16 (no divergence to account for).
- ``decode`` (batch 1, 16, 64) and ``prefill`` (one 1,024-token prompt) tokens/s of the engine.
- ``roofline``: the batch-1 decode step vs weight bytes / HBM bandwidth (measured here by a
  device-to-device copy, and the nominal figure of the card where known).
- ``summary``: exit status 1 when a check failed.

    python bench/gpu_check.py                             # CUDA, bf16, ~1B (est. 2-3 min on one H100)
    python bench/gpu_check.py --device cpu --size tiny    # CPU smoke mode (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from kvrelay_worker.model.tiny import SIZES as TINY_SHAPES  # the same shapes as kvrelay-make-tiny-model

# Shapes built with transformers' LlamaConfig. "1b": 2048 hidden, 16 layers, 32 query / 8 KV heads
# (GQA), SwiGLU 8192, vocab 32000, untied LM head: 1.1B parameters. Llama 3 RoPE scaling with an
# original context of 1,024 so the 1,100-token prompt runs past it.
SIZES: dict[str, dict] = {
    "tiny": dict(
        **TINY_SHAPES["tiny"],
        vocab_size=512,
        max_position_embeddings=2048,
        # transformers' default init (std 0.02) on 64-wide layers gives near-uniform attention; 0.1
        # gives the per-element scale std * sqrt(hidden) of the 1b shape, so attention matters
        initializer_range=0.1,
    ),
    "1b": dict(**TINY_SHAPES["1b"], vocab_size=32000, max_position_embeddings=4096),
}
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}
LOGIT_PROMPT_LENS = [7, 64, 333, 1100]  # one >= 1,000 tokens, past the original RoPE context
NUM_GREEDY_PROMPTS, GREEDY_NEW_TOKENS = 16, 64
DECODE_BATCHES, DECODE_PROMPT_LEN, PREFILL_LEN = [1, 16, 64], 128, 1024
WORK = {  # timed decode steps, prefill repeats, bandwidth buffer bytes
    "tiny": dict(decode_steps=8, prefill_repeats=3, bw_bytes=64 << 20),
    "1b": dict(decode_steps=32, prefill_repeats=5, bw_bytes=1 << 30),
}
# kvrelay bf16 vs transformers bf16 may be at most this many times transformers' own bf16 noise
# (transformers bf16 vs transformers fp32), in max and in mean abs logit difference. If kvrelay's
# bf16 rounding is no worse than transformers', the triangle inequality bounds the ratio by 2
# (|kv16 - hf16| <= |kv16 - hf32| + |hf16 - hf32|); 3 leaves kvrelay's own bf16 error up to twice
# transformers'. Measured in CPU smoke mode (tiny): ratio 1.0 (max) and 1.0 (mean); a RoPE sign flip
# gives 19 and 25, RMSNorm eps 1e-3 instead of 1e-5 gives 4.0 and 6.4 (and 80x the fp32 bound below).
BF16_FACTOR = 3.0
# kvrelay fp32 vs transformers fp32 differ only by summation order (~1e-6 relative), three orders of
# magnitude below bf16 rounding; this fraction of the bf16 noise is still far above that. Measured in
# CPU smoke mode: 4e-5 x the bf16 noise (logits), 2e-5 (paged engine); a decode position off by one
# or a KV write one slot off in the paged engine gives 11 and 12, 200x the bound.
FP32_FRACTION = 0.05
# A greedy difference is a near-tie when the reference's top-2 margin there is below NEAR_TIE_FACTOR
# x the max logit difference between the engine and transformers measured on the generation steps
# before any difference (batch 16 and batch 1): a flip needs the two top logits to move the margin
# apart, each by at most that noise (x2); x1.5 headroom because the step where they differ is not
# among the steps measured.
NEAR_TIE_FACTOR = 3.0
# Nominal HBM bandwidth (GB/s) by device name, most specific first (vendor data sheets).
NOMINAL_GB_S = [
    ("H100 PCIe", 2000.0, "H100 PCIe HBM2e 2.0 TB/s"),
    ("H100 NVL", 3900.0, "H100 NVL HBM3 3.9 TB/s"),
    ("H100", 3350.0, "H100 SXM5 HBM3 3.35 TB/s"),
    ("H200", 4800.0, "H200 HBM3e 4.8 TB/s"),
]


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Token ids in [3, vocab): no pad (0), BOS (1) or EOS (2) ids inside the prompts."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


# ---- the model ---------------------------------------------------------------------------------------
def build_models(size: str, device: torch.device, seed: int, model_dir: str) -> dict:
    """transformers fp32 (built here) and bf16 copies; kvrelay fp32 and bf16 loads of its checkpoint."""
    import transformers
    from kvrelay_worker.model import load_model
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = LlamaConfig(
        **SIZES[size],
        rms_norm_eps=1e-5,
        rope_parameters=dict(ROPE),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=None,  # generate() runs all max_new_tokens, like the engine's ignore_eos
        pad_token_id=0,
    )
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        hf32 = LlamaForCausalLM(cfg)
    hf32 = hf32.to(device=device, dtype=torch.float32).eval()
    sync(device)
    t1 = time.perf_counter()
    hf32.save_pretrained(model_dir)  # fp32 safetensors: kvrelay's bf16 = the same cast as hf16's
    t2 = time.perf_counter()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    kv32 = load_model(model_dir, device=device, dtype=torch.float32)
    kv16 = load_model(model_dir, device=device, dtype=torch.bfloat16)
    sync(device)
    t3 = time.perf_counter()
    params = sum(p.numel() for p in hf32.parameters())
    emit(
        {
            "check": "model",
            "size": size,
            "params_m": round(params / 1e6, 1),
            "shape": {k: v for k, v in SIZES[size].items()},
            "rope": ROPE["rope_type"],
            "attn_implementation": hf32.config._attn_implementation,
            "build_s": round(t1 - t0, 2),
            "save_pretrained_s": round(t2 - t1, 2),
            "load_s": round(t3 - t2, 2),
        }
    )
    return {"hf32": hf32, "hf16": hf16, "kv32": kv32, "kv16": kv16}


# ---- 1. logits ------------------------------------------------------------------------------------
class AbsDiff:
    """Running max and mean of |a - b| over every logit compared."""

    def __init__(self) -> None:
        self.max, self.sum, self.count = 0.0, 0.0, 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        d = (a.float() - b.float()).abs()
        self.max = max(self.max, float(d.max()))
        self.sum += float(d.double().sum())
        self.count += d.numel()

    @property
    def mean(self) -> float:
        return self.sum / max(self.count, 1)

    def as_dict(self) -> dict[str, float]:
        return {"max": float(f"{self.max:.4g}"), "mean": float(f"{self.mean:.4g}")}


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else math.inf)


@torch.inference_mode()
def check_logits(models: dict, device: torch.device, seed: int) -> dict:
    vocab = models["kv16"].config.vocab_size
    prompts = random_prompts(LOGIT_PROMPT_LENS, vocab, seed + 1)
    pairs = {k: AbsDiff() for k in ("kv16_vs_hf16", "hf16_vs_hf32", "kv16_vs_hf32", "kv32_vs_hf32")}
    scale = AbsDiff()  # |hf32 logits|: the size of the logits themselves
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out = {name: models[name](ids).logits[0].float() for name in ("hf32", "hf16")}
        out.update({name: models[name].full_forward_logits(ids)[0] for name in ("kv32", "kv16")})
        for key, diff in pairs.items():
            a, b = key.split("_vs_")
            diff.add(out[a], out[b])
        scale.add(out["hf32"], torch.zeros_like(out["hf32"]))
        del out
    noise = pairs["hf16_vs_hf32"]
    r_max = ratio(pairs["kv16_vs_hf16"].max, noise.max)
    r_mean = ratio(pairs["kv16_vs_hf16"].mean, noise.mean)
    fp32_frac = ratio(pairs["kv32_vs_hf32"].max, noise.max)
    passed = r_max <= BF16_FACTOR and r_mean <= BF16_FACTOR and fp32_frac <= FP32_FRACTION
    line = {
        "check": "logits",
        "prompt_lens": LOGIT_PROMPT_LENS,
        "positions": sum(LOGIT_PROMPT_LENS),
        "logit_abs": scale.as_dict(),
        **{k: v.as_dict() for k, v in pairs.items()},
        "kv16_vs_hf16_over_hf_bf16_noise": {"max": round(r_max, 3), "mean": round(r_mean, 3)},
        "kv32_vs_hf32_over_hf_bf16_noise_max": float(f"{fp32_frac:.3g}"),
        "tolerance": f"kv16_vs_hf16 <= {BF16_FACTOR} x hf16_vs_hf32 (max and mean); "
        f"kv32_vs_hf32 max <= {FP32_FRACTION} x hf16_vs_hf32 max",
        "passed": passed,
    }
    emit(line)
    return line


# ---- 2. greedy ------------------------------------------------------------------------------------
@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int, device: torch.device) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' generate(do_sample=False): tokens and the raw logits [V] (fp32) of every step."""
    ids = torch.tensor([prompt], device=device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), [step[0].float() for step in out.logits]


class LogitRecorder:
    """Wraps ``model.compute_logits`` so every engine step's logits (fp32) are kept."""

    def __init__(self, model) -> None:
        self.model, self.steps = model, []

    def __enter__(self) -> LogitRecorder:
        inner = type(self.model).compute_logits

        def record(hidden: torch.Tensor) -> torch.Tensor:
            logits = inner(self.model, hidden)
            self.steps.append(logits.detach().clone())
            return logits

        self.model.compute_logits = record
        return self

    def __exit__(self, *exc) -> None:
        del self.model.compute_logits


def engine_greedy(
    engine, prompts: list[list[int]], params
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Run ``prompts`` together to completion: tokens and the engine's logits [V] at every step.

    The runner computes logits for the sampled sequences in schedule order and the scheduler returns
    their outputs in the same order, so row i of a step's logits belongs to the step's output i.
    """
    ids = [f"g{i}" for i in range(len(prompts))]
    index = {rid: i for i, rid in enumerate(ids)}
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params, now=0.0)
    with LogitRecorder(engine.model) as rec:
        while engine.has_work():
            before = len(rec.steps)
            outputs = engine.step(now=0.0).outputs
            if not outputs:
                continue
            assert len(rec.steps) == before + 1 and len(rec.steps[-1]) == len(outputs)
            for row, o in zip(rec.steps[-1], outputs, strict=True):
                tokens[index[o.request_id]].extend(o.new_token_ids)
                logits[index[o.request_id]].append(row)
            rec.steps.clear()
    return tokens, logits


def first_difference(ref: list[int], got: list[int]) -> int | None:
    for step, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a != b:
            return step
    return None if len(ref) == len(got) else min(len(ref), len(got))


def top2_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def check_greedy(models: dict, device: torch.device, seed: int, bf16_noise: float) -> dict:
    from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams

    kv16, hf16 = models["kv16"], models["hf16"]
    lengths = [16 + (53 * i) % 240 for i in range(NUM_GREEDY_PROMPTS)]
    prompts = random_prompts(lengths, kv16.config.vocab_size, seed + 2)
    n = GREEDY_NEW_TOKENS
    t0 = time.perf_counter()
    refs = [hf_greedy(hf16, p, n, device) for p in prompts]
    t1 = time.perf_counter()
    block = 16
    cfg = EngineConfig(
        num_blocks=NUM_GREEDY_PROMPTS * (-(-(max(lengths) + n) // block)) + 2,
        block_size=block,
        max_num_seqs=NUM_GREEDY_PROMPTS,
        max_batch_tokens=2048,  # the 16 prompts (~2,100 tokens) prefill in two chunked steps
        device=str(device),
        dtype="bfloat16",
    )
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    runs = {"engine_batch16": engine_greedy(Engine(kv16, cfg), prompts, params)}
    t2 = time.perf_counter()
    engine = Engine(kv16, cfg)
    one = [engine_greedy(engine, [p], params) for p in prompts]
    runs["engine_batch1"] = ([t[0] for t, _ in one], [lg[0] for _, lg in one])
    t3 = time.perf_counter()

    # the noise between the engine and transformers: logits on the steps before the first difference
    noise = {name: AbsDiff() for name in runs}
    for name, (outputs, logits) in runs.items():
        for got, steps, (ref_tokens, ref_logits) in zip(outputs, logits, refs, strict=True):
            agree = first_difference(ref_tokens, got)
            for step in range(len(ref_tokens) if agree is None else agree):
                noise[name].add(steps[step], ref_logits[step])
    noise_max = max(d.max for d in noise.values())
    near_tie = NEAR_TIE_FACTOR * noise_max

    def account(outputs: list[list[int]]) -> dict:
        diverged = []
        for i, (got, (ref_tokens, ref_logits)) in enumerate(zip(outputs, refs, strict=True)):
            step = first_difference(ref_tokens, got)
            if step is None:
                continue
            margin = top2_margin(ref_logits[step]) if step < len(ref_logits) else math.inf
            diverged.append(
                {
                    "prompt": i,
                    "step": step,
                    "ref_margin": float(f"{margin:.4g}"),
                    "near_tie": margin < near_tie,
                }
            )
        return {
            "identical": NUM_GREEDY_PROMPTS - len(diverged),
            "near_ties": sum(d["near_tie"] for d in diverged),
            "not_near_tie": sum(not d["near_tie"] for d in diverged),
            "diverged": diverged,
        }

    accounts = {name: account(outputs) for name, (outputs, _) in runs.items()}
    for name, d in noise.items():
        accounts[name]["vs_hf_logits_on_agreeing_steps"] = {
            **d.as_dict(),
            "steps": d.count // kv16.config.vocab_size,
        }
    noise_ratio = ratio(noise_max, bf16_noise)
    passed = all(a["not_near_tie"] == 0 for a in accounts.values()) and noise_ratio <= BF16_FACTOR
    b16, b1 = runs["engine_batch16"][0], runs["engine_batch1"][0]
    line = {
        "check": "greedy",
        "prompts": NUM_GREEDY_PROMPTS,
        "new_tokens": n,
        "prompt_lens": [min(lengths), max(lengths)],
        **accounts,
        "batch16_equals_batch1": sum(a == b for a, b in zip(b16, b1, strict=True)),
        "engine_noise_over_hf_bf16_noise_max": round(noise_ratio, 3),
        "near_tie_tol": float(f"{near_tie:.4g}"),
        "rule": f"a difference is a near-tie if the reference top-2 margin < {NEAR_TIE_FACTOR} x the max "
        "engine-vs-hf logit difference on agreeing steps; fails on any other difference, or when that "
        f"logit difference exceeds {BF16_FACTOR} x hf16_vs_hf32 max",
        "hf_generate_s": round(t1 - t0, 2),
        "engine_batch16_s": round(t2 - t1, 2),
        "engine_batch1_s": round(t3 - t2, 2),
        "passed": passed,
    }
    emit(line)
    return line


@torch.inference_mode()
def check_paged(models: dict, device: torch.device, seed: int, bf16_noise: float) -> dict:
    """The paged engine (chunked prefill, decode, 16 sequences of different lengths) vs a full
    recompute of the same kvrelay model on the engine's own tokens, in fp32 and in bf16: no
    divergence to account for, so fp32 shows the paged path's error at fp32 noise level."""
    from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams

    vocab = models["kv16"].config.vocab_size
    lengths = [16 + (53 * i) % 240 for i in range(NUM_GREEDY_PROMPTS)]
    prompts = random_prompts(lengths, vocab, seed + 2)
    n, block = GREEDY_NEW_TOKENS, 16
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    diffs = {}
    for name, dtype in (("kv32", "float32"), ("kv16", "bfloat16")):
        model = models[name]
        cfg = EngineConfig(
            num_blocks=NUM_GREEDY_PROMPTS * (-(-(max(lengths) + n) // block)) + 2,
            block_size=block,
            max_num_seqs=NUM_GREEDY_PROMPTS,
            max_batch_tokens=512,  # prefill in chunks of at most 512 tokens over several steps
            device=str(device),
            dtype=dtype,
        )
        outputs, logits = engine_greedy(Engine(model, cfg), prompts, params)
        diff = diffs[name] = AbsDiff()
        for p, got, steps in zip(prompts, outputs, logits, strict=True):
            full = model.full_forward_logits(torch.tensor([p + got[:-1]], device=device))[0, len(p) - 1 :]
            diff.add(torch.stack(steps), full)
    r32, r16 = ratio(diffs["kv32"].max, bf16_noise), ratio(diffs["kv16"].max, bf16_noise)
    passed = r32 <= FP32_FRACTION and r16 <= BF16_FACTOR
    line = {
        "check": "paged",
        "prompts": NUM_GREEDY_PROMPTS,
        "new_tokens": n,
        "fp32_engine_vs_recompute": diffs["kv32"].as_dict(),
        "bf16_engine_vs_recompute": diffs["kv16"].as_dict(),
        "fp32_over_hf_bf16_noise_max": float(f"{r32:.3g}"),
        "bf16_over_hf_bf16_noise_max": round(r16, 3),
        "tolerance": f"fp32 max <= {FP32_FRACTION} x hf16_vs_hf32 max; "
        f"bf16 max <= {BF16_FACTOR} x hf16_vs_hf32 max",
        "passed": passed,
    }
    emit(line)
    return line


# ---- 3. tokens/s ------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def decode_step_times(model, device: torch.device, batch: int, steps: int, warmup: int = 4) -> list[float]:
    """Seconds per engine decode step of ``batch`` sequences with 128-token prompts."""
    from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams

    block = 16
    total = DECODE_PROMPT_LEN + warmup + steps + 2
    cfg = EngineConfig(
        num_blocks=batch * (-(-total // block)) + 2,
        block_size=block,
        max_num_seqs=batch,
        max_batch_tokens=batch * DECODE_PROMPT_LEN,
        device=str(device),
        dtype="bfloat16",
    )
    engine = Engine(model, cfg)
    params = SamplingParams(max_tokens=warmup + steps + 2, ignore_eos=True)
    for i, p in enumerate(random_prompts([DECODE_PROMPT_LEN] * batch, model.config.vocab_size, batch)):
        engine.add_request(str(i), p, params, now=0.0)
    engine.step(now=0.0)  # every prompt in one prefill step
    for _ in range(warmup):
        engine.step(now=0.0)
    times = []
    for _ in range(steps):
        times.append(timed(lambda: engine.step(now=0.0), device))
    for i in range(batch):
        engine.abort(str(i))
    return times


def check_decode(model, device: torch.device, steps: int) -> dict[int, float]:
    medians = {}
    for batch in DECODE_BATCHES:
        times = decode_step_times(model, device, batch, steps)
        med = statistics.median(times)
        medians[batch] = med
        emit(
            {
                "check": "decode",
                "batch": batch,
                "prompt_len": DECODE_PROMPT_LEN,
                "steps": steps,
                "step_ms": round(med * 1e3, 3),
                "step_min_ms": round(min(times) * 1e3, 3),
                "tok_s": round(batch / med, 1),
            }
        )
    return medians


def check_prefill(model, device: torch.device, repeats: int) -> None:
    from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams

    block = 16
    cfg = EngineConfig(
        num_blocks=-(-(PREFILL_LEN + 1) // block) + 2,
        block_size=block,
        max_num_seqs=1,
        max_batch_tokens=PREFILL_LEN,
        device=str(device),
        dtype="bfloat16",
    )
    engine = Engine(model, cfg)
    prompt = random_prompts([PREFILL_LEN], model.config.vocab_size, 7)[0]
    times = []
    for r in range(repeats + 2):  # two warm-ups

        def once(rid: str = str(r)) -> None:
            engine.add_request(rid, prompt, SamplingParams(max_tokens=2), now=0.0, prefill_only=True)
            while engine.has_work():
                engine.step(now=0.0)

        elapsed = timed(once, device)
        engine.release(str(r))
        if r >= 2:
            times.append(elapsed)
    med = statistics.median(times)
    emit(
        {
            "check": "prefill",
            "prompt_len": PREFILL_LEN,
            "repeats": repeats,
            "ms": round(med * 1e3, 3),
            "min_ms": round(min(times) * 1e3, 3),
            "tok_s": round(PREFILL_LEN / med, 1),
        }
    )


# ---- 4. roofline ------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a large copy on ``device``: (bytes read + bytes written) / time, median."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(repeats)]
    return 2 * nbytes / statistics.median(times)


def check_roofline(model, device: torch.device, step_s: float, steps: int, nbytes: int) -> None:
    cfg = model.config
    # bytes a batch-1 decode step must read: every weight but the embedding table (one row is
    # gathered), plus the K/V of the context (prompt + warm-up + half the timed steps on average)
    weights = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n
    )
    ctx = DECODE_PROMPT_LEN + 4 + steps // 2
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * ctx * 2
    bw = copy_bandwidth(device, nbytes)
    name = device_name(device)
    nominal = (
        next(((gb, src) for key, gb, src in NOMINAL_GB_S if key in name), None)
        if device.type == "cuda"
        else None
    )
    roof_s = (weights + kv) / bw
    line = {
        "check": "roofline",
        "device": name,
        "weight_bytes": weights,
        "kv_bytes": kv,
        "bandwidth_measured_gb_s": round(bw / 1e9, 1),
        "bandwidth_measured_by": f"{'device-to-device' if device.type == 'cuda' else 'CPU memory'} copy of "
        f"{nbytes >> 20} MiB, (read + written bytes) / median time",
        "roofline_basis": "measured bandwidth",
        "roofline_ms": round(roof_s * 1e3, 4),
        "decode_step_ms": round(step_s * 1e3, 3),
        "fraction_of_roofline": round(roof_s / step_s, 3),
        "bandwidth_nominal_gb_s": nominal[0] if nominal else None,
        "nominal_source": nominal[1] if nominal else "unknown device: no nominal figure",
        "measured_over_nominal": round(bw / 1e9 / nominal[0], 3) if nominal else None,
        "roofline_nominal_ms": round((weights + kv) / (nominal[0] * 1e9) * 1e3, 4) if nominal else None,
        "fraction_of_nominal_roofline": (
            round((weights + kv) / (nominal[0] * 1e9) / step_s, 3) if nominal else None
        ),
    }
    emit(line)


# ---- main ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (use --device cpu --size tiny)", file=sys.stderr)
        return 2
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 (no TF32) for the noise reference
    emit(
        {
            "check": "device",
            "device": device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "bf16_supported": torch.cuda.is_bf16_supported() if device.type == "cuda" else True,
            "transformers": __import__("transformers").__version__,
        }
    )
    failures = []
    with tempfile.TemporaryDirectory(prefix=f"kvrelay-gpu-check-{args.size}-") as tmp:
        models = build_models(args.size, device, args.seed, tmp)
    logits = check_logits(models, device, args.seed)
    if not logits["passed"]:
        failures.append("logits")
    greedy = check_greedy(models, device, args.seed, logits["hf16_vs_hf32"]["max"])
    if not greedy["passed"]:
        failures.append("greedy")
    paged = check_paged(models, device, args.seed, logits["hf16_vs_hf32"]["max"])
    if not paged["passed"]:
        failures.append("paged")
    kv16 = models["kv16"]
    for name in ("hf32", "kv32"):  # free memory before the timings
        del models[name]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    work = WORK[args.size]
    medians = check_decode(kv16, device, work["decode_steps"])
    check_prefill(kv16, device, work["prefill_repeats"])
    check_roofline(kv16, device, medians[1], work["decode_steps"], work["bw_bytes"])
    emit(
        {
            "check": "summary",
            "passed": not failures,
            "failures": failures,
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
