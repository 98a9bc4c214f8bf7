"""Tensor parallelism on this CPU: what the all-reduces cost, and what each rank moves per KV relay.

Every rank runs the paged engine's own forward path (``ModelRunner.replay``: the step rank 0 sends
its ranks) on its shard: a prefill of one prompt and decode steps of a batch. TP=1 runs the same
path in one process with the same total threads, in the same run, as the baseline. CPU TP is for
correctness, not speed: the ranks share two cores, and every layer adds two gloo all-reduces.
Also reported: the largest logit difference between TP and TP=1 after the prefill (the float
noise the token-equality tests' near-tie bound is set against; bf16 on CUDA), and, per pairing of prefill TP p
and decode TP d, the bytes each reader and holder rank moves for one prompt (from the run plans the
relay executes). Prints one JSON line.

    python bench/tensor_parallel.py [--size 100m] [--tp 2] [--prompt 512] [--batch 8] [--steps 20]
    python bench/tensor_parallel.py --device cuda --size 1b      # two GPUs: TP 2 over NCCL
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kvrelay_worker.engine.paged_attention import allocate_kv_cache
from kvrelay_worker.engine.runner import ModelRunner, StepInputs
from kvrelay_worker.kv import KVLayout
from kvrelay_worker.kv.runs import plan_runs, readers_of, source_slices
from kvrelay_worker.model.loader import load_model
from kvrelay_worker.model.parallel import SINGLE, TensorParallel
from kvrelay_worker.model.tiny import make_tiny_model
from kvrelay_worker.ports import free_port

BLOCK = 16


def _blocks(n_tokens: int, first: int) -> list[int]:
    return list(range(first, first + -(-n_tokens // BLOCK)))


@torch.inference_mode()
def run_rank(rank: int, size: int, port: int, args: argparse.Namespace, model_dir: str, out: dict) -> None:
    """One rank: time a prefill and decode steps (median of repeats); rank 0 reports."""
    torch.set_num_threads(max(1, args.threads // size))
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(rank)
    tp = SINGLE
    if size > 1:
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        tp = TensorParallel(rank=rank, size=size, group=dist.group.WORLD)
    model = load_model(model_dir, device, dtype, tp=tp)
    ctx = args.prompt + args.steps + 1
    per_seq = -(-ctx // BLOCK)
    num_blocks = 1 + per_seq * (args.batch + 1)
    kv = allocate_kv_cache(model.config, num_blocks, BLOCK, dtype, device, model.num_kv_heads_local)
    runner = ModelRunner(model, kv, BLOCK)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt,), generator=gen).tolist()

    def barrier() -> None:
        if cuda:
            torch.cuda.synchronize()
        if size > 1:
            dist.barrier()

    prefill_s, hidden = [], None
    for _ in range(args.repeats):
        barrier()
        t0 = time.perf_counter()
        hidden = runner._prefill_forward([prompt], [0], [_blocks(args.prompt, 1)])
        if cuda:
            torch.cuda.synchronize()
        prefill_s.append(time.perf_counter() - t0)
    # decode: a batch whose prompts are prefilled (one chunk each), then steps of one token each
    tables = [_blocks(ctx, 1 + per_seq * (i + 1)) for i in range(args.batch)]
    for table in tables:
        runner._prefill_forward([prompt], [0], [table])
    decode_s = []
    for step in range(args.steps):
        barrier()
        t0 = time.perf_counter()
        runner.replay(StepInputs([[5]] * args.batch, [args.prompt + step] * args.batch, tables, decode=True))
        if cuda:
            torch.cuda.synchronize()
        decode_s.append(time.perf_counter() - t0)
    if rank == 0:
        assert hidden is not None
        out[size] = {
            "prefill_ms": 1e3 * statistics.median(prefill_s),
            "decode_step_ms": 1e3 * statistics.median(decode_s[2:]),
            "logits": model.compute_logits(hidden[-1:]).squeeze(0).cpu(),
        }
    if size > 1:
        dist.destroy_process_group()


def measure(size: int, args: argparse.Namespace, model_dir: str) -> dict:
    out = mp.Manager().dict()
    if size == 1:
        run_rank(0, 1, 0, args, model_dir, out)
    else:
        mp.spawn(run_rank, args=(size, free_port(), args, model_dir, out), nprocs=size, join=True)
    return dict(out[size])


def relay_bytes(config: dict, prompt: int, dtype: str, pairings: list[tuple[int, int]]) -> dict[str, dict]:
    """Per pairing: bytes each reader rank reads and each holder rank serves for one prompt."""
    result = {}
    n_blocks = -(-prompt // BLOCK)
    for p, d in pairings:
        if config["num_key_value_heads"] % p or config["num_key_value_heads"] % d:
            continue  # a pairing this model's KV heads cannot be split for
        base = dict(
            model_id="m", num_layers=config["num_hidden_layers"], block_size=BLOCK,
            num_kv_heads=config["num_key_value_heads"],
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            dtype=dtype,
        )  # fmt: skip
        holder, reader = KVLayout(**base, tp_size=p), KVLayout(**base, tp_size=d)
        ids = list(range(1, n_blocks + 1))
        per_reader = []
        per_holder = [0] * p
        for r in range(d):
            total = 0
            for s in source_slices(holder, reader, r):
                moved = int(
                    plan_runs(holder, n_blocks + 1, ids, reader, n_blocks + 1, r, ids, s.holder_rank)[
                        :, 2
                    ].sum()
                )
                total += moved
                per_holder[s.holder_rank] += moved
            per_reader.append(total)
        result[f"{p}->{d}"] = {
            "reader_rank_bytes": per_reader,
            "holder_rank_bytes": per_holder,
            "claims_per_reader_rank": len(source_slices(holder, reader, 0)),
            "readers_per_holder_rank": len(readers_of(holder, reader, 0)),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m", help="random checkpoint preset (model/tiny.py)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total, shared by the ranks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(Path(tmp) / "m", args.size))
        config = json.loads((Path(model_dir) / "config.json").read_text())
        base = measure(1, args, model_dir)
        tp = measure(args.tp, args, model_dir)
    noise = float((tp["logits"] - base["logits"]).abs().max())
    line = {
        "bench": "tensor_parallel",
        "model": args.size,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "threads_total": args.threads,
        "prompt_tokens": args.prompt,
        "decode_batch": args.batch,
        f"tp{args.tp}": {k: round(v, 2) for k, v in tp.items() if k != "logits"},
        "tp1": {k: round(v, 2) for k, v in base.items() if k != "logits"},
        "prefill_ratio": round(tp["prefill_ms"] / base["prefill_ms"], 3),
        "decode_step_ratio": round(tp["decode_step_ms"] / base["decode_step_ms"], 3),
        "max_logit_diff_vs_tp1": noise,
        "relay_bytes_per_prompt": relay_bytes(
            config,
            args.prompt,
            "bfloat16" if args.device == "cuda" else "float32",
            [(1, 1), (2, 2), (1, 2), (2, 1), (4, 1), (4, 2)],
        ),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
