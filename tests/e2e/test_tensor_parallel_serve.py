"""TP workers behind the router, through the official openai client (`kvrelay serve`, tiny checkpoint).

- the seed's pairing: a TP 2 prefill worker relaying to TP 1 decode workers over NIXL; greedy text
  equals the single-process engine's;
- a TP 2 decode worker loses a rank under live streams: the worker exits, the router resumes its
  streams on the other decode worker, and no client sees an error or a different text.

Greedy equality per shared/notes/token-equality.md (greedy_text_checks.py); the tiny model's logit
noise between TP 2 and TP 1 is below 2e-5 (bench/tensor_parallel.py, fp32), NEAR_TIE is 5x that.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from greedy_text_checks import check_greedy, greedy_references
from kvrelay_worker.engine.core import Engine, EngineConfig
from kvrelay_worker.model_store import ensure_tiny_model
from kvrelay_worker.tokenizer import Tokenizer
from serve_helpers import WORKER_RE, ServeProcess, freeze_while_relaying, run_serve
from worker_fixtures import child_pids, metric_value, process_alive

pytestmark = pytest.mark.e2e

NEAR_TIE = 1e-4
MAX_NEAR_TIES = 1
MAX_TOKENS = 64
PROMPTS = [f"Tensor parallel request {i}: numbers like {i * 13} and words" for i in range(8)]


@pytest.fixture(scope="module")
def tiny() -> tuple[Path, Tokenizer, Engine]:
    model = ensure_tiny_model()
    return model, Tokenizer.from_dir(model), Engine.from_dir(model, EngineConfig())


async def _streams(serve: ServeProcess, prompts: list[str], during=None) -> list[tuple[str, str | None]]:
    """All prompts as concurrent greedy streams; ``during`` runs once every stream has tokens."""
    client = openai.AsyncOpenAI(base_url=serve.base_url, api_key="none", max_retries=0, timeout=300)
    started = [0] * len(prompts)

    async def one(i: int) -> tuple[str, str | None]:
        parts = []
        try:
            stream = await client.completions.create(
                model=serve.model, prompt=prompts[i], max_tokens=MAX_TOKENS, stream=True, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                started[i] += 1
        except openai.APIError as exc:
            return "".join(parts), f"{type(exc).__name__}: {exc}"
        return "".join(parts), None

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    try:
        if during is not None:
            deadline = time.monotonic() + 180
            while min(started) < 3:
                assert time.monotonic() < deadline and not any(t.done() for t in tasks)
                await asyncio.sleep(0.01)
            during()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 300))
    finally:
        await client.close()


def _router_metric(serve: ServeProcess, name: str, **labels: str) -> float:
    text = httpx.get(serve.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return metric_value(text, name, model=serve.model, **labels) or 0.0


async def test_tp2_prefill_to_tp1_decode_through_the_router(tiny, tmp_path: Path) -> None:
    model, tokenizer, engine = tiny
    refs = greedy_references(engine, tokenizer, PROMPTS, MAX_TOKENS)
    args = ["--model", str(model), "--kv-backend", "nixl", "--prefill-tensor-parallel", "2", "--decode", "2"]
    with run_serve(args, tmp_path / "logs") as serve:
        ranks = _rank_processes(serve)
        assert len(ranks) == 1  # the prefill worker's rank 1
        outcomes = await _streams(serve, PROMPTS)
        assert [error for _, error in outcomes] == [None] * len(PROMPTS)
        check_greedy(tokenizer, refs, [text for text, _ in outcomes], NEAR_TIE, MAX_NEAR_TIES)
        for port in _metrics_ports(serve, "decode"):  # every prompt's KV came over the relay
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            assert (metric_value(text, "kvrelay_kv_transfer_bytes_total", role="decode") or 0) > 0
            assert "kvrelay_kv_transfer_failures_total{" not in text
    _assert_gone(ranks)


async def test_a_tp2_decode_worker_losing_a_rank_is_resumed_elsewhere(tiny, tmp_path: Path) -> None:
    model, tokenizer, engine = tiny
    refs = greedy_references(engine, tokenizer, PROMPTS, MAX_TOKENS)
    args = ["--model", str(model), "--kv-backend", "nixl", "--decode", "2", "--decode-tensor-parallel", "2"]
    with run_serve(args, tmp_path / "logs") as serve:
        ranks = _rank_processes(serve)
        before = _router_metric(serve, "kvrelay_router_migrations_total", reason="worker_lost")
        victim: list[int] = []
        outcomes = await _streams(
            serve, PROMPTS, during=lambda: victim.append(_kill_a_rank_of_a_busy_decode(serve))
        )
        decode_pid = victim[0]
        assert [error for _, error in outcomes] == [None] * len(PROMPTS)
        check_greedy(tokenizer, refs, [text for text, _ in outcomes], NEAR_TIE, MAX_NEAR_TIES)
        assert _router_metric(serve, "kvrelay_router_migrations_total", reason="worker_lost") > before
        deadline = time.monotonic() + 20
        while process_alive(decode_pid):  # rank 0 of the broken worker exits too
            assert time.monotonic() < deadline, "rank 0 outlived its lost rank by 20 s"
            time.sleep(0.1)
    _assert_gone(ranks)


def _kill_a_rank_of_a_busy_decode(serve: ServeProcess) -> int:
    """SIGKILL rank 1 of a decode worker the router still relays a stream from; returns its rank 0's pid.

    Rank 0 is frozen meanwhile (no stream it holds can finish), then resumed to find its rank lost."""
    decode = [(pid, address) for name, (pid, address) in serve.workers.items() if name.startswith("decode")]
    deadline = time.monotonic() + 30
    while True:
        for pid, address in decode:
            if freeze_while_relaying(serve.base_url, pid, address):
                (rank1,) = child_pids(pid)
                os.kill(rank1, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
                return pid
        assert time.monotonic() < deadline, "no decode worker kept a stream to kill a rank under"


def _rank_processes(serve: ServeProcess) -> list[int]:
    """The rank processes (other than rank 0) of every worker `kvrelay serve` started."""
    return [child for pid, _ in serve.workers.values() for child in child_pids(pid)]


def _metrics_ports(serve: ServeProcess, role: str) -> list[int]:
    return [int(m[4]) for line in serve.output if (m := WORKER_RE.search(line)) and m[1].startswith(role)]


def _assert_gone(pids: list[int]) -> None:
    """Rank processes die with their rank 0 (PR_SET_PDEATHSIG) or on its stop: none is left behind."""
    deadline = time.monotonic() + 10
    while alive := [pid for pid in pids if process_alive(pid)]:
        assert time.monotonic() < deadline, f"rank processes left behind: {alive}"
        time.sleep(0.1)
