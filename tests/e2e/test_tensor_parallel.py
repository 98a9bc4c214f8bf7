"""Tensor parallelism end to end: real worker processes of TP 1, 2 and 3 ranks, real KV relays.

- the TP engine: greedy output of a TP worker (its prefill, then its decode batch of 1 and 16
  with the prompt recomputed, no relay) == the TP 1 paged engine in this process;
- the relay between TP degrees: prefill TP p -> decode TP d over NIXL and tcp, including d < p
  (a decode rank reads its heads from several prefill ranks), == the TP 1 engine;
- a lost rank: the worker exits non-zero, its streams end with an error, nothing hangs.

Token equality per shared/notes/token-equality.md: at the first difference, the TP 1 reference's
top-2 logit margin there must be below NEAR_TIE (TP sums o_proj and down_proj in a different
order, so logits differ by float noise: measured below 2e-5 on these models in fp32), and at most
MAX_NEAR_TIES of a batch's prompts may end at one.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from kvrelay_worker.engine import Engine, EngineConfig, SamplingParams
from kvrelay_worker.model.tiny import make_tiny_model
from kvrelay_worker.ports import free_port_pair
from worker_fixtures import (
    WorkerProcess,
    child_pids,
    decode_inputs,
    prefill_inputs,
    process_alive,
    run_workers,
)

NEAR_TIE = 2e-3  # 100x the measured TP noise; a broken shard moves logits by 1e-1 and more
MAX_NEAR_TIES = 2
MAX_TOKENS = 12
BLOCKS = ("--num-blocks", "256")
STREAM_TIMEOUT_S = 120.0


def tp_args(tp: int) -> tuple[str, ...]:
    if tp == 1:
        return BLOCKS
    return (*BLOCKS, "--tensor-parallel", str(tp), "--tp-port", str(free_port_pair()))


def reference(model_dir: Path, prompts: list[list[int]]) -> tuple[Engine, list[list[int]]]:
    engine = Engine.from_dir(model_dir, EngineConfig(num_blocks=512))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return engine, engine.generate(prompts, params)


def margin(engine: Engine, prompt: list[int], prefix: list[int]) -> float:
    """The TP 1 model's top-2 logit margin after ``prompt + prefix`` (full recompute)."""
    logits = engine.model.full_forward_logits(torch.tensor([prompt + prefix]))[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def assert_token_exact(
    engine: Engine, prompts: list[list[int]], expected: list[list[int]], got: list[list[int]]
) -> None:
    near_ties = []
    for i, (prompt, want, have) in enumerate(zip(prompts, expected, got, strict=True)):
        if have == want:
            continue
        step = next(
            (s for s, (a, b) in enumerate(zip(want, have, strict=False)) if a != b), min(len(want), len(have))
        )
        if step >= min(len(want), len(have)):
            pytest.fail(f"prompt {i}: {len(have)} tokens, reference {len(want)}")
        m = margin(engine, prompt, want[:step])
        assert m < NEAR_TIE, (
            f"prompt {i} step {step}: reference {want[step]}, got {have[step]}, margin {m:.3g}"
        )
        near_ties.append((i, step, m))
    assert len(near_ties) <= MAX_NEAR_TIES, f"too many near-ties: {near_ties}"


def prefill(address: str, prompts: list[list[int]]) -> list[tuple[int, bytes]]:
    client = grpcclient.InferenceServerClient(address)
    out = []
    for prompt in prompts:
        res = client.infer(
            "kvrelay_prefill", prefill_inputs(grpcclient, prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
        out.append((int(res.as_numpy("token_id")[0]), res.as_numpy("kv_handle")[0]))
    return out


def decode(
    address: str, prompts: list[list[int]], firsts: list[tuple[int, bytes]], relay: bool
) -> list[list[int]]:
    """All prompts in one stream at once (one decode batch); ``relay=False`` recomputes the prompt."""
    client = grpcclient.InferenceServerClient(address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tokens = {str(i): [first] for i, (first, _) in enumerate(firsts)}
    try:
        for i, (prompt, (first, handle)) in enumerate(zip(prompts, firsts, strict=True)):
            inputs = decode_inputs(
                grpcclient, prompt, first, handle if relay else b"", max_tokens=MAX_TOKENS, ignore_eos=True
            )
            client.async_stream_infer("kvrelay_decode", inputs, request_id=str(i))
        done: set[str] = set()
        while len(done) < len(prompts):
            result, error = results.get(timeout=STREAM_TIMEOUT_S)
            assert error is None, error
            rid = result.get_response().id
            if result.get_response().outputs:
                tokens[rid].append(int(result.as_numpy("token_id")[0]))
            if result.get_response().parameters["triton_final_response"].bool_param:
                done.add(rid)
    finally:
        client.stop_stream()
    return [tokens[str(i)] for i in range(len(prompts))]


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(5, 40))] for _ in range(n)]


# ---------------------------------------------------------------------------- random checkpoint, TP 2
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 query heads, 2 KV heads: TP 2 divides them."""
    return make_tiny_model(tmp_path_factory.mktemp("tp-tiny"))


@pytest.fixture(scope="module")
def tiny_reference(tiny: Path) -> tuple[Engine, list[list[int]], list[list[int]]]:
    prompts = random_prompts(16, 500, seed=15)
    engine, expected = reference(tiny, prompts)
    return engine, prompts, expected


@pytest.fixture(scope="module", params=["nixl", "tcp"])
def tiny_workers(request: pytest.FixtureRequest, tiny: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Prefill and decode workers of TP 1 and TP 2 on one KV backend."""
    specs = [(role, tiny, tp_args(tp)) for role in ("prefill", "decode") for tp in (1, 2)]
    with run_workers(specs, kv_backend=request.param, ready_timeout_s=240) as workers:
        names = [f"{role}{tp}" for role in ("prefill", "decode") for tp in (1, 2)]
        yield dict(zip(names, workers, strict=True))


@pytest.mark.parametrize("batch", [1, 16])
def test_tp2_engine_matches_tp1(tiny_workers: dict[str, WorkerProcess], tiny_reference, batch: int) -> None:
    engine, prompts, expected = tiny_reference
    prompts, expected = prompts[:batch], expected[:batch]
    firsts = prefill(tiny_workers["prefill2"].grpc_address, prompts)
    got = decode(tiny_workers["decode2"].grpc_address, prompts, firsts, relay=False)
    assert_token_exact(engine, prompts, expected, got)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 2), (1, 2), (2, 1)])
def test_relay_between_tp_degrees_matches_tp1(
    tiny_workers: dict[str, WorkerProcess], tiny_reference, prefill_tp: int, decode_tp: int
) -> None:
    engine, prompts, expected = tiny_reference
    firsts = prefill(tiny_workers[f"prefill{prefill_tp}"].grpc_address, prompts)
    handles = [json.loads(h) for _, h in firsts]
    assert all([r["rank"] for r in h["ranks"]] == list(range(prefill_tp)) for h in handles)
    assert all(h["layout"]["tp_size"] == prefill_tp for h in handles)
    got = decode(tiny_workers[f"decode{decode_tp}"].grpc_address, prompts, firsts, relay=True)
    assert_token_exact(engine, prompts, expected, got)
    metrics = _metrics(tiny_workers[f"decode{decode_tp}"])
    assert "kvrelay_kv_transfer_failures_total{" not in metrics, "a relay failed and was recomputed"


def _metrics(worker: WorkerProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


# ---------------------------------------------------------------------------- SmolLM2, TP 3
@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_dir: Path) -> list[list[int]]:
    from smollm2_reference import CHAT_PROMPTS
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    return [tok.encode(p).ids for p in CHAT_PROMPTS]


def test_smollm2_tp3_engine_and_relay_to_tp1_match_tp1(smollm2_dir: Path, smollm2_prompts) -> None:
    """9 query heads and 3 KV heads: TP 3 (TP 2 does not divide them). Batch 1 and 16 through the TP 3
    engine, then TP 3 prefill -> TP 1 decode over NIXL (each decode rank reads three prefill ranks)."""
    engine, expected = reference(smollm2_dir, smollm2_prompts)
    specs = [
        ("prefill", smollm2_dir, tp_args(3)),
        ("decode", smollm2_dir, tp_args(3)),
        ("decode", smollm2_dir, tp_args(1)),
    ]
    with run_workers(specs, kv_backend="nixl", ready_timeout_s=300) as (prefill3, decode3, decode1):
        firsts = prefill(prefill3.grpc_address, smollm2_prompts)
        for batch in (1, 16):
            got = decode(decode3.grpc_address, smollm2_prompts[:batch], firsts[:batch], relay=False)
            assert_token_exact(engine, smollm2_prompts[:batch], expected[:batch], got)
        got = decode(decode1.grpc_address, smollm2_prompts, firsts, relay=True)
        assert_token_exact(engine, smollm2_prompts, expected, got)
        assert "kvrelay_kv_transfer_failures_total{" not in _metrics(decode1)


def test_tp_degree_that_does_not_divide_the_heads_is_refused(smollm2_dir: Path) -> None:
    from worker_fixtures import worker_command

    flags = ["--tensor-parallel", "2", "--tp-port", str(free_port_pair()), "--grpc-port", "0"]
    flags += ["--metrics-port", "0", "--kv-backend", "none", "--threads", "1"]
    cmd = worker_command("prefill", smollm2_dir, *flags)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert (
        "tensor parallel 2 does not divide the model's 9 attention heads and the model's 3 KV heads"
        in proc.stderr
    )


# ---------------------------------------------------------------------------- a lost rank


@pytest.mark.parametrize("victim", ["rank1", "rank0"])
def test_a_lost_rank_ends_the_worker(tiny: Path, victim: str) -> None:
    """Kill one rank of a TP 2 decode worker mid-stream: the stream ends with an error, the worker's
    processes all exit (non-zero) within the deadline, and none is left half alive."""
    deadline_s = 20.0
    prompt = random_prompts(1, 500, seed=7)[0]
    with run_workers([("decode", tiny, tp_args(2))], kv_backend="none", ready_timeout_s=240) as (worker,):
        rank0 = worker.proc.pid
        (rank1,) = child_pids(rank0)
        client = grpcclient.InferenceServerClient(worker.grpc_address)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            inputs = decode_inputs(grpcclient, prompt, 5, b"", max_tokens=100000, ignore_eos=True)
            client.async_stream_infer("kvrelay_decode", inputs, request_id="long")
            for _ in range(3):  # it is generating
                _, error = results.get(timeout=STREAM_TIMEOUT_S)
                assert error is None, error
            os.kill(rank1 if victim == "rank1" else rank0, signal.SIGKILL)
            killed = time.monotonic()
            if victim == "rank1":
                error = None
                while error is None:  # tokens already in flight may still arrive
                    _, error = results.get(timeout=deadline_s)
                assert "lost" in str(error) or "engine failed" in str(error), error
            code = worker.proc.wait(timeout=deadline_s)
            assert code != 0
            survivor = rank0 if victim == "rank1" else rank1
            while process_alive(survivor):
                assert time.monotonic() - killed < deadline_s, f"pid {survivor} outlived its worker"
                time.sleep(0.1)
        finally:
            client.stop_stream()


# ---------------------------------------------------------------------------- the benchmark, smoke-run
def test_tp_bench_reports_noise_well_under_the_near_tie_bound() -> None:
    """bench/tensor_parallel.py runs (so it cannot rot) and measures the TP noise NEAR_TIE is set against."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "bench/tensor_parallel.py", "--size", "tiny", "--prompt", "48", "--batch", "2"]
    proc = subprocess.run(
        [*cmd, "--steps", "4", "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 <= line["max_logit_diff_vs_tp1"] < NEAR_TIE / 50
    for pairing, moved in line["relay_bytes_per_prompt"].items():
        # every head of every block is read once, whatever the pairing: readers and holders move the same
        assert sum(moved["reader_rank_bytes"]) == sum(moved["holder_rank_bytes"]), pairing
        assert sum(moved["reader_rank_bytes"]) == sum(
            line["relay_bytes_per_prompt"]["1->1"]["reader_rank_bytes"]
        )
    assert line["tp2"]["decode_step_ms"] > 0 and line["tp1"]["prefill_ms"] > 0


# ---------------------------------------------------------------------------- a group over two "pods"
def test_a_tp2_worker_spanning_two_pods_matches_tp1(tiny: Path, tiny_reference) -> None:
    """The LeaderWorkerSet shape on one host: pod 0 (rank 0, gRPC) and pod 1 (rank 1 only, /ready on its
    metrics port) started apart, meeting at the leader's address with the shared KVRELAY_TP_SECRET."""
    import urllib.request

    from kvrelay_worker.ports import free_port
    from worker_fixtures import worker_command

    engine, prompts, expected = tiny_reference
    port, metrics = free_port_pair(), free_port()
    group = ("--tensor-parallel", "2", "--tp-nodes", "2", "--tp-port", str(port), *BLOCKS)
    env = {**os.environ, "KVRELAY_TP_SECRET": "test-group-key", "OMP_NUM_THREADS": "1"}
    pod1 = subprocess.Popen(
        worker_command("decode", tiny, *group, "--tp-node-rank", "1", "--tp-leader-addr", "127.0.0.1",
                       "--metrics-port", str(metrics), "--kv-backend", "tcp", "--threads", "1"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        os.environ["KVRELAY_TP_SECRET"] = "test-group-key"  # pod 0, started by run_workers, shares it
        with run_workers([("decode", tiny, (*group, "--tp-node-rank", "0"))], ready_timeout_s=240) as (pod0,):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/ready", timeout=10) as resp:
                assert resp.status == 200  # the non-leader pod's readiness probe
            firsts = [(want[0], b"") for want in expected]
            got = decode(pod0.grpc_address, prompts, firsts, relay=False)
            assert_token_exact(engine, prompts, expected, got)
        assert pod1.wait(timeout=30) == 0  # rank 0 drained and told it to stop
    finally:
        os.environ.pop("KVRELAY_TP_SECRET", None)
        if pod1.poll() is None:
            pod1.kill()
        pod1.wait()


def test_a_group_spanning_pods_refuses_to_start_without_the_shared_key(tiny: Path) -> None:
    from worker_fixtures import worker_command

    env = {k: v for k, v in os.environ.items() if k != "KVRELAY_TP_SECRET"}
    cmd = worker_command("decode", tiny, "--tensor-parallel", "2", "--tp-nodes", "2", "--tp-node-rank", "1",
                         "--kv-backend", "none", "--metrics-port", "0")  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs KVRELAY_TP_SECRET" in proc.stderr  # argparse's usage error
    assert "Traceback" not in proc.stderr
