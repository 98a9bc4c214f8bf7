"""Mid-stream migration with real processes (`kvrelay serve --model tiny`, the official openai client).

Decode workers are SIGTERMed (drain) and SIGKILLed under live streams, a prefill worker is killed while it
holds published but unclaimed KV, and both decode workers are lost at once. Clients must see no error (or,
with no decode worker left, a clear one within ERROR_BOUND_S), the text must equal an uninterrupted run's,
and the surviving workers' KV caches must end up empty.

Greedy equality follows shared/notes/token-equality.md against the single-process engine: at the first
difference, the engine's top-2 logit margin there must be below NEAR_TIE. The tiny model's logit noise
between a full recompute and an incremental one is 5e-6 (measured: logits of a prefix vs the same
positions in a longer sequence, 8 random 200-token prompts); NEAR_TIE is 20x that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from greedy_text_checks import Reference, check_greedy, greedy_references
from kvrelay_worker.entrypoint import build_parser as worker_parser
from kvrelay_worker.model_store import ensure_tiny_model
from kvrelay_worker.processes import stop_process
from kvrelay_worker.tokenizer import Tokenizer
from serve_helpers import WORKER_RE, ServeProcess, freeze_while_relaying, pid_alive, run_serve
from worker_fixtures import WorkerProcess, metric_value, spawn_worker

pytestmark = pytest.mark.e2e

NEAR_TIE = 1e-4
MAX_NEAR_TIES = 2  # of 32 streams
MAX_TOKENS = 320
# Fewer streams than 32 run faster (8 x 320 tokens in about 0.5 s on a quiet machine): the seeded and
# structured ones run longer, so that the kill (one poll of a few ms after its condition holds) lands far
# from their end even when a loaded machine stalls the test for a while.
LONG_MAX_TOKENS = 1000
ERROR_BOUND_S = 10.0  # both decode workers gone: every stream has its error event this soon after the kill
PROMPTS = [f"Numbers such as {i} appear in logs, question {i * 7}" for i in range(32)]
# What a worker started without these flags uses (`kvrelay serve` and Stack.ensure pass none of them).
WORKER_DEFAULTS = worker_parser()
# The router's gRPC channel to a dead worker's address reconnects at least every 2 s (router/kserve.py:
# gRPC's default backoff grows to 120 s; a probe before the cap saw a worker back on its address taken
# 25 s after it was ready, the old one gone 47 s). The router checks health every 1 s.
REJOIN_S = 30.0
OUTAGE_S = 30.0
EXIT_SLACK_S = 5.0  # a drained worker's teardown and interpreter exit, on a loaded 2-core machine
# Per live worker, what must read 0 once no stream runs: blocks in use (a prefill worker's leased KV
# included), blocks held under a lease, and the requests that could still own blocks.
KV_IN_USE = (
    "kvrelay_kv_cache_usage_ratio",
    "kvrelay_kv_held_blocks",
    "kvrelay_requests_running",
    "kvrelay_requests_waiting",
)


@dataclass
class Stack:
    serve: ServeProcess
    model_dir: Path
    tokenizer: Tokenizer
    workers: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # name -> pid, grpc, metrics
    respawned: list[WorkerProcess] = field(default_factory=list)
    calm: tuple[list[Reference], list[Outcome]] | None = None  # _calm_run's, computed once
    # One client for the router's /health and /metrics: httpx.get builds a client (and its TLS context)
    # per call, 70-130 ms under 32 streams against 2-8 ms on a kept connection (measured), and the kill
    # condition is polled. Idle connections expire before uvicorn's 5 s keep-alive closes them (a request
    # sent on one the server is closing fails).
    http: httpx.Client = field(
        default_factory=lambda: httpx.Client(timeout=10, limits=httpx.Limits(keepalive_expiry=1.0))
    )

    @classmethod
    def of(cls, serve: ServeProcess) -> Stack:
        model_dir = ensure_tiny_model()
        stack = cls(serve, model_dir, Tokenizer.from_dir(model_dir))
        for line in serve.output:
            if m := WORKER_RE.search(line):
                stack.workers[m.group(1)] = (int(m.group(2)), m.group(3), int(m.group(4)))
        return stack

    @property
    def root(self) -> str:
        return self.serve.base_url.removesuffix("/v1")

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict[str, Any]:
        return self.http.get(self.root + "/health").json()

    def router_metric(self, name: str, **labels: str) -> float:
        text = self.http.get(self.root + "/metrics").text
        return metric_value(text, name, model=self.serve.model, **labels) or 0.0

    def first_tokens(self) -> float:
        """Prefill answers the router got (its TTFT count), whether or not their text was empty."""
        return self.router_metric("kvrelay_time_to_first_token_seconds_count")

    def worker_metric_sum(self, role: str, name: str, **labels: str) -> float:
        total = 0.0
        for worker, (_, _, port) in self.workers.items():
            if worker.startswith(role):
                with contextlib.suppress(httpx.HTTPError):
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
                    total += metric_value(text, name, **labels) or 0.0
        return total

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.workers[name][0], sig)

    def decode_progress(self) -> dict[str, tuple[int, float]]:
        """Per decode worker, from its own /metrics: the requests in its running batch and the tokens it
        generated so far.

        The worker's view, not the router's: the router counts a stream on a worker from its call until it
        relayed the stream's last token, so its /health also counts streams still waiting there for their
        KV, or already done there (seen: 16 and 16 in the router, 0 and 9 in the workers' batches; and
        once a kill of the router's busiest worker resumed no stream)."""
        progress = {}
        for name, (_, _, port) in self.workers.items():
            if name.startswith("decode"):
                text = self.http.get(f"http://127.0.0.1:{port}/metrics").text
                running, generated = (
                    metric_value(text, series, model=self.serve.model) or 0.0
                    for series in ("kvrelay_requests_running", "kvrelay_generation_tokens_total")
                )
                progress[name] = (int(running), generated)
        return progress

    @staticmethod
    def busiest_decode(running: dict[str, int]) -> tuple[str, int]:
        """The decode worker running the most streams in `running` (by name), and how many."""
        name = max(running, key=lambda n: running[n])
        assert running[name] > 0, f"no stream ran on a decode worker: {running}"
        return name, running[name]

    def kill_busiest_decode(self, running: dict[str, int]) -> str:
        """SIGKILL the decode worker running the most streams in `running`; returns its name.

        Frozen first, and killed only while the router still relays a stream from it: between the read
        of `running` and the kill a loaded machine can let the worker finish its last streams, and a kill
        that lands on none tests nothing (seen once: no stream resumed). Otherwise it goes on and the
        busiest worker is read again."""
        deadline = time.monotonic() + 30
        while True:
            name, _ = self.busiest_decode(running)
            pid, address, _ = self.workers[name]
            if freeze_while_relaying(self.serve.base_url, pid, address):
                self.kill(name)
                return name
            assert time.monotonic() < deadline, f"no decode worker kept a stream to kill: {running}"
            running = {worker: r for worker, (r, _) in self.decode_progress().items()}

    def ensure(self, name: str) -> float | None:
        """Start a fresh worker on `name`'s address unless it is alive and healthy in the router; returns
        the seconds the router took to take a fresh one back once it was ready (None: none started)."""
        pid, address, metrics_port = self.workers[name]
        role = name.split("-")[0]
        if pid_alive(pid) and self._draining(metrics_port):
            # Left draining by a test that failed before it saw the worker out: it will not come back.
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
        # e.g. paused a moment ago: the router's readiness checks take it back (unless it exits meanwhile)
        if pid_alive(pid) and self._wait_healthy(name, role, address, while_alive=pid):
            return None
        port = address.rsplit(":", 1)[1]
        worker, ready = spawn_worker(
            role, self.model_dir, "--grpc-port", port, "--served-model-name", self.serve.model,
            kv_backend="tcp",
        )  # fmt: skip
        self.respawned.append(worker)
        assert ready.wait(180), f"respawned {name} did not start:\n{worker.log()}"
        ready_at = time.monotonic()
        self.workers[name] = (worker.proc.pid, address, worker.metrics_port)
        self._wait_healthy(name, role, address)
        return time.monotonic() - ready_at

    def _draining(self, metrics_port: int) -> bool:
        try:  # a paused worker does not answer: not draining
            response = self.http.get(f"http://127.0.0.1:{metrics_port}/ready", timeout=2)
        except httpx.HTTPError:
            return False
        return response.status_code == 503 and "draining" in response.text

    def _wait_healthy(self, name: str, role: str, address: str, while_alive: int | None = None) -> bool:
        """Until the router counts `name` healthy (True), or process `while_alive` is gone (False)."""
        deadline = time.monotonic() + REJOIN_S
        while not self.health()["workers"][role][address]["healthy"]:
            if while_alive is not None and not pid_alive(while_alive):
                return False
            assert time.monotonic() < deadline, f"the router did not take {name} back"
            time.sleep(0.1)
        return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = ["--model", "tiny", "--prefill", "2", "--decode", "2", "--kv-backend", "tcp"]
    with run_serve(args, tmp_path_factory.mktemp("logs")) as serve:
        s = Stack.of(serve)
        try:
            yield s
        finally:
            s.close()
            for worker in s.respawned:
                worker.stop()
    assert serve.leftovers == []


@pytest.fixture(scope="module")
def engine(stack: Stack) -> Any:
    from kvrelay_worker.engine.core import Engine, EngineConfig

    return Engine.from_dir(stack.model_dir, EngineConfig())


def _greedy_references(stack: Stack, engine: Any, prompts: list[str]) -> list[Reference]:
    return greedy_references(engine, stack.tokenizer, prompts, MAX_TOKENS)


def _check_greedy(tokenizer: Tokenizer, refs: list[Reference], texts: list[str]) -> list[tuple[int, int]]:
    return check_greedy(tokenizer, refs, texts, NEAR_TIE, MAX_NEAR_TIES)


@dataclass
class Outcome:
    text: str
    finish: str | None
    error: str | None
    ended_at: float


async def _streams(
    stack: Stack,
    prompts: list[str],
    kill: Callable[[dict[str, int]], None] | None = None,
    tokens_each: int = 6,
    params: list[dict[str, Any]] | None = None,
    kill_when: Callable[[], bool] | None = None,
    max_tokens: int = MAX_TOKENS,
    all_running: bool = False,
) -> tuple[list[Outcome], float]:
    """Run the prompts as concurrent streams; `kill(running)` runs once every stream has its first token,
    the decode workers generated `tokens_each` tokens per stream on average and some decode worker still
    runs streams, all of them with `all_running` (or once `kill_when()` says so). `running` is each decode
    worker's running batch (`Stack.decode_progress`) read just before the kill (empty with `kill_when`).

    Tokens, not text chunks: the detokenizer holds back text while the bytes so far are not valid UTF-8,
    which a random-weight model sampling at temperature 1 can keep up for many tokens.

    Returns the outcomes and the kill time (monotonic).
    """
    client = openai.AsyncOpenAI(base_url=stack.serve.base_url, api_key="none", max_retries=0, timeout=120)

    async def one(i: int) -> Outcome:
        parts: list[str] = []
        finish = None
        extra = dict((params or [{}] * len(prompts))[i])
        body = {"ignore_eos": True, **extra.pop("extra_body", {})}
        try:
            stream = await client.completions.create(
                model=stack.serve.model, prompt=prompts[i], max_tokens=max_tokens, stream=True,
                **{"temperature": 0, **extra}, extra_body=body,
            )  # fmt: skip
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
        except openai.APIError as exc:
            return Outcome("".join(parts), finish, f"{type(exc).__name__}: {exc}", time.monotonic())
        return Outcome("".join(parts), finish, None, time.monotonic())

    n = len(prompts)
    first = stack.first_tokens()
    # Not with kill_when: those callers pause the decode workers, whose /metrics would not answer.
    generated = sum(g for _, g in stack.decode_progress().values()) if kill and not kill_when else 0.0
    seen: dict[str, Any] = {}  # what the last poll saw, for the failure messages

    def in_flight() -> dict[str, int] | None:
        """What `kill` gets once the condition holds (each decode worker's running batch), else None."""
        if kill_when is not None:
            return {} if kill_when() else None
        seen["first_tokens"] = stack.first_tokens() - first
        if seen["first_tokens"] < n:
            return None
        # Read last and acted on at once: the kill lands on the streams this says are running. Some may
        # have ended already (they do not start in step); the others still run.
        progress = stack.decode_progress()
        seen["tokens"] = sum(g for _, g in progress.values()) - generated
        seen["running"] = {name: r for name, (r, _) in progress.items()}
        runs = sum(seen["running"].values())
        if seen["tokens"] < n * tokens_each or not (runs == n or (runs and not all_running)):
            return None
        return seen["running"]

    def try_kill() -> float | None:
        """Run `kill` if the condition holds now and return when; None if it does not hold yet."""
        running = in_flight()
        if running is None:
            return None
        assert kill is not None
        kill(running)
        return time.monotonic()

    killed_at = 0.0
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        if kill is not None:
            deadline = time.monotonic() + 120
            # Polled in a thread, so that the event loop goes on sending the requests and reading the streams
            # (a poll on the loop would block it for its HTTP reads).
            while (at := await asyncio.to_thread(try_kill)) is None:
                ended = {i: t.result() for i, t in enumerate(tasks) if t.done()}
                failed = {i: o for i, o in ended.items() if o.error is not None}
                assert not failed, f"streams failed before the kill: {failed}"
                assert not (all_running and ended), (
                    f"streams ended before all {n} ran at once: {ended}, {seen}"
                )
                assert len(ended) < n, f"every stream ended before the kill condition held: {seen}"
                assert time.monotonic() < deadline, f"no kill within 120 s: {seen}"
                await asyncio.sleep(0.01)
            killed_at = at
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 300)), killed_at
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


async def _calm_run(stack: Stack, engine: Any) -> tuple[list[Reference], list[Outcome]]:
    """The engine's greedy references for PROMPTS and one uninterrupted run of them as 32 streams (checked
    against the references), computed once for the tests that compare a disturbed run with it."""
    if stack.calm is None:
        refs = _greedy_references(stack, engine, PROMPTS)
        calm, _ = await _streams(stack, PROMPTS)
        assert [o.error for o in calm] == [None] * 32
        _check_greedy(stack.tokenizer, refs, [o.text for o in calm])
        stack.calm = refs, calm
    return stack.calm


def _assert_no_kv_leaked(stack: Stack) -> float:
    """Wait until every live worker's KV cache is empty (KV_IN_USE all 0); fail after the longest a worker
    may legitimately hold KV. Returns the seconds waited."""
    from kvrelay_worker.kv.base import CLAIM_MARGIN_S

    # A prefill worker keeps KV nobody claimed (its reader died first) until the lease expires, and KV
    # claimed by a reader that died mid-read until the claim's hold (the reader's fetch deadline plus a
    # margin) ends; whatever is still in use after both is leaked.
    lease_s = WORKER_DEFAULTS.get_default("kv_lease_s")
    claim_s = WORKER_DEFAULTS.get_default("kv_fetch_timeout_s") + CLAIM_MARGIN_S
    bound_s = max(lease_s, claim_s) + EXIT_SLACK_S
    started = time.monotonic()
    while True:
        in_use = {}
        for name, (pid, _, port) in stack.workers.items():
            if not pid_alive(pid):  # killed by the test: only the survivors must be empty
                continue
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            values = {series: metric_value(text, series, model=stack.serve.model) for series in KV_IN_USE}
            if any(v != 0 for v in values.values()):  # an absent series (None) counts: it must be there
                in_use[name] = values
        waited = time.monotonic() - started
        if not in_use:
            return waited
        assert waited < bound_s, f"KV still in use {waited:.0f} s after the streams ended: {in_use}"
        time.sleep(0.2)


class _ExitWatch:
    """Polls, in a thread, for a process to be gone: the test's event loop is busy with the streams."""

    def __init__(self, pid: int, limit_s: float) -> None:
        self.started = time.monotonic()
        self.gone_at: float | None = None
        self._thread = threading.Thread(target=self._poll, args=(pid, limit_s), daemon=True)
        self._thread.start()

    def _poll(self, pid: int, limit_s: float) -> None:
        while time.monotonic() - self.started < limit_s:
            if not pid_alive(pid):
                self.gone_at = time.monotonic()
                return
            time.sleep(0.02)

    def seconds(self) -> float | None:
        """Seconds from the start until the process was gone; None if it outlived `limit_s`."""
        self._thread.join()
        return None if self.gone_at is None else self.gone_at - self.started


def _exit_code(stack: Stack, name: str, pid: int, log_from: int, timeout_s: float = 5.0) -> int:
    """Exit code of the (gone) worker `name`: `kvrelay serve` logs its own children's (checked once a second);
    one that Stack.ensure respawned is this process's child."""
    respawned = next((w for w in stack.respawned if w.proc.pid == pid), None)
    if respawned is not None:
        return respawned.proc.wait(timeout_s)
    pattern = re.compile(rf"worker {re.escape(name)} exited with code (-?\d+);")
    deadline = time.monotonic() + timeout_s
    while True:
        for line in stack.serve.output[log_from:]:
            if m := pattern.search(line):
                return int(m.group(1))
        assert time.monotonic() < deadline, f"kvrelay serve did not report {name}'s exit"
        time.sleep(0.1)


async def test_decode_worker_sigterm_under_32_streams(stack: Stack, engine: Any) -> None:
    """The busiest decode worker SIGTERMed mid-stream drains: it finishes its streams and exits 0 within its
    drain deadline; no client error, every text as without the signal."""
    from kvrelay_worker.server.app import STOP_GRACE_S

    stack.ensure("decode-0")
    stack.ensure("decode-1")
    refs, calm = await _calm_run(stack, engine)

    # No --drain-seconds reaches the workers, so the default applies: far longer than these streams take,
    # so the victim must finish its own streams (the drain path) rather than hand them on at the deadline.
    drain_s = WORKER_DEFAULTS.get_default("drain_seconds")
    # The drain ends by its deadline, then the gRPC server gets STOP_GRACE_S to flush the last responses.
    exit_bound_s = drain_s + STOP_GRACE_S + EXIT_SLACK_S
    reasons = ("draining", "worker_lost")
    before = {r: stack.router_metric("kvrelay_router_migrations_total", reason=r) for r in reasons}
    log_from = len(stack.serve.output)  # serve reports each of its children's exit once: only look after
    victim: dict[str, Any] = {}

    def sigterm(running: dict[str, int]) -> None:
        name, streams = stack.busiest_decode(running)
        pid = stack.workers[name][0]
        stack.kill(name, signal.SIGTERM)
        victim.update(name=name, pid=pid, streams=streams, watch=_ExitWatch(pid, exit_bound_s))

    started = time.monotonic()
    outcomes, _ = await _streams(stack, PROMPTS, kill=sigterm)
    elapsed = time.monotonic() - started
    assert [o.error for o in outcomes] == [None] * 32
    assert all(o.finish == "length" for o in outcomes)
    near_ties = _check_greedy(stack.tokenizer, refs, [o.text for o in outcomes])
    differ = [i for i, (a, b) in enumerate(zip(calm, outcomes, strict=True)) if a.text != b.text]
    assert set(differ) <= {i for i, _ in near_ties}

    exit_s = victim["watch"].seconds()
    assert exit_s is not None, f"{victim['name']} still running {exit_bound_s:.0f} s after its SIGTERM"
    code = _exit_code(stack, victim["name"], victim["pid"], log_from)
    migrations = {
        r: stack.router_metric("kvrelay_router_migrations_total", reason=r) - before[r] for r in reasons
    }
    figures = {
        "streams": 32, "victim_streams": victim["streams"], "drain_deadline_s": drain_s,
        "exit_code": code, "exit_after_s": round(exit_s, 2),
        # Negative when the victim was gone before the other worker's last stream ended.
        "exit_after_last_stream_s": round(victim["watch"].gone_at - max(o.ended_at for o in outcomes), 2),
        "migrations": migrations,
        "near_ties": near_ties, "run_s": round(elapsed, 2),
    }  # fmt: skip
    assert code == 0, figures
    # A drained worker never looks lost, and with a deadline this far off it hands nothing on at the deadline:
    # it was gone long before it. ("draining" refusals may happen: on a loaded machine a stream's decode call
    # can reach the victim just after the signal, and the router rightly sends it elsewhere.)
    assert migrations["worker_lost"] == 0 and exit_s < drain_s / 2, figures
    figures["kv_empty_after_s"] = round(_assert_no_kv_leaked(stack), 2)
    print(json.dumps(figures))
    stack.ensure(victim["name"])


async def test_decode_worker_killed_under_32_streams(stack: Stack, engine: Any) -> None:
    """One of two decode workers SIGKILLed mid-stream: no client error, every text as without the kill."""
    stack.ensure("decode-0")
    stack.ensure("decode-1")
    refs, calm = await _calm_run(stack, engine)

    before = stack.router_metric("kvrelay_router_migrations_total", reason="worker_lost")
    started = time.monotonic()
    victim: list[str] = []
    killed, _ = await _streams(
        stack, PROMPTS, kill=lambda running: victim.append(stack.kill_busiest_decode(running))
    )
    elapsed = time.monotonic() - started
    assert [o.error for o in killed] == [None] * 32
    assert all(o.finish == "length" for o in killed)
    near_ties = _check_greedy(stack.tokenizer, refs, [o.text for o in killed])
    differ = [i for i, (a, b) in enumerate(zip(calm, killed, strict=True)) if a.text != b.text]
    assert set(differ) <= {i for i, _ in near_ties}
    migrations = stack.router_metric("kvrelay_router_migrations_total", reason="worker_lost") - before
    assert migrations > 0
    resumes = stack.router_metric("kvrelay_router_resume_seconds_count", via="prefill")
    resume_s = stack.router_metric("kvrelay_router_resume_seconds_sum", via="prefill") / max(resumes, 1)
    kv_empty_s = _assert_no_kv_leaked(stack)
    print(
        json.dumps(
            {"streams": 32, "migrations": migrations, "mean_resume_s": round(resume_s, 4),
             "near_ties": near_ties, "run_s": round(elapsed, 2), "kv_empty_after_s": round(kv_empty_s, 2)}
        )
    )  # fmt: skip
    stack.ensure(victim[0])


@pytest.mark.parametrize("penalties", [{}, {"presence_penalty": 1.0, "frequency_penalty": 0.5}])
async def test_seeded_sampling_across_a_migration(
    stack: Stack, engine: Any, penalties: dict[str, float]
) -> None:
    """temperature 1 with a seed (and penalties): a resumed stream draws what the uninterrupted one drew.

    The penalties need no state in the router: the resumed worker counts the tokens already sent (the
    tail of its input) as generated."""
    from kvrelay_worker.engine.sampling_params import SamplingParams

    stack.ensure("decode-0")
    stack.ensure("decode-1")
    prompts = PROMPTS[:8]
    params = [{"temperature": 1.0, "seed": 1000 + i, **penalties} for i in range(8)]
    calm, _ = await _streams(stack, prompts, params=params, max_tokens=LONG_MAX_TOKENS)
    before = stack.router_metric("kvrelay_router_migrations_total", reason="worker_lost")
    victim: list[str] = []
    killed, _ = await _streams(
        stack, prompts, kill=lambda running: victim.append(stack.kill_busiest_decode(running)),
        params=params, max_tokens=LONG_MAX_TOKENS,
    )  # fmt: skip
    assert [o.error for o in killed] == [None] * 8
    assert stack.router_metric("kvrelay_router_migrations_total", reason="worker_lost") > before
    assert [o.text for o in killed] == [o.text for o in calm]
    # ... and both equal the single-process engine's seeded draws (a seed is a seed, wherever it runs).
    ids = [stack.tokenizer.encode(p) for p in prompts]
    seeded = [SamplingParams(max_tokens=LONG_MAX_TOKENS, ignore_eos=True, **p) for p in params]
    assert [stack.tokenizer.decode(t) for t in engine.generate(ids, seeded)] == [o.text for o in calm]
    stack.ensure(victim[0])


async def test_structured_output_across_a_migration(stack: Stack, engine: Any) -> None:
    """A grammar-constrained, seeded, penalized stream whose decode worker is SIGKILLed: the resumed worker
    replays the output so far into a new matcher, so the text still matches the grammar and equals the
    uninterrupted run's (grammar and penalty state travel as the request's own tokens)."""
    from kvrelay_worker.engine.sampling_params import SamplingParams
    from kvrelay_worker.router.structured import structured_outputs_grammar

    stack.ensure("decode-0")
    stack.ensure("decode-1")
    # Long enough to be mid-stream at the kill (about 400 tokens), then EOS well before LONG_MAX_TOKENS.
    regex = "([a-z]{2,8} ){200}[a-z]{1,8}[.]"
    prompts = PROMPTS[:6]
    params = [
        {"temperature": 1.0, "seed": 500 + i, "presence_penalty": 0.5,
         "extra_body": {"ignore_eos": False, "structured_outputs": {"regex": regex}}}
        for i in range(6)
    ]  # fmt: skip
    calm, _ = await _streams(stack, prompts, params=params, max_tokens=LONG_MAX_TOKENS)
    assert all(re.fullmatch(regex, o.text) for o in calm), [
        (o.text, o.finish) for o in calm if not re.fullmatch(regex, o.text)
    ]
    assert [o.finish for o in calm] == ["stop"] * 6
    before = stack.router_metric("kvrelay_router_migrations_total", reason="worker_lost")
    victim: list[str] = []
    killed, _ = await _streams(
        stack, prompts, kill=lambda running: victim.append(stack.kill_busiest_decode(running)),
        params=params, max_tokens=LONG_MAX_TOKENS,
    )  # fmt: skip
    assert [o.error for o in killed] == [None] * 6
    assert stack.router_metric("kvrelay_router_migrations_total", reason="worker_lost") > before
    assert [o.text for o in killed] == [o.text for o in calm]
    grammar = structured_outputs_grammar({"regex": regex})
    same = {"max_tokens": LONG_MAX_TOKENS, "temperature": 1.0, "presence_penalty": 0.5, "grammar": grammar}
    seeded = [SamplingParams(seed=500 + i, **same) for i in range(6)]
    ids = [stack.tokenizer.encode(p) for p in prompts]
    outs = engine.generate(ids, seeded)
    assert [stack.tokenizer.decode(t) for t in outs] == [o.text for o in calm]
    stack.ensure(victim[0])


async def test_resume_cost(stack: Stack) -> None:
    """Resume latency on the tiny model, re-prefill + relay vs recompute on the decode worker, per length.

    Also the stall a recompute on the decode worker puts on another stream running there.
    """
    import random

    from kvrelay_worker.router.kserve import WorkerClient

    stack.ensure("decode-0")
    prefill = WorkerClient(stack.workers["prefill-1"][1])
    decode = WorkerClient(stack.workers["decode-0"][1])
    greedy = {"temperature": 0.0, "ignore_eos": True}
    rng = random.Random(5)

    async def next_token(stream: Any) -> float:
        await anext(stream)
        return time.monotonic()

    async def via_prefill(ids: list[int]) -> tuple[float, float]:
        t0 = time.monotonic()
        first = await prefill.prefill("cost", ids, {**greedy, "max_tokens": 3})
        t1 = time.monotonic()
        stream = decode.decode("cost", ids, first.token_id, first.kv_handle, {**greedy, "max_tokens": 3})
        t2 = await next_token(stream)
        await stream.aclose()
        return t1 - t0, t2 - t0

    async def via_decode(ids: list[int]) -> tuple[float, float]:
        t0 = time.monotonic()
        stream = decode.decode("cost", ids[:-1], ids[-1], b"", {**greedy, "max_tokens": 4})
        t1 = await next_token(stream)
        t2 = await next_token(stream)
        await stream.aclose()
        return t1 - t0, t2 - t0

    async def stall_of_a_neighbour(resume: Callable[[list[int]], Any], ids: list[int]) -> float:
        """Longest gap between tokens of another stream on the decode worker while `resume` runs."""
        stamps: list[float] = []
        background = decode.decode("bg", [7] * 16, 9, b"", {**greedy, "max_tokens": 1000})

        async def consume() -> None:
            async for _ in background:
                stamps.append(time.monotonic())

        task = asyncio.create_task(consume())
        while len(stamps) < 20:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        await resume(ids)
        t1 = time.monotonic()
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        during = [b - a for a, b in itertools.pairwise(stamps) if b >= t0 and a <= t1]
        return max(during, default=0.0)

    rows = []
    try:
        for n in (64, 512, 1536):
            ids = [rng.randrange(5, 500) for _ in range(n)]
            a = [await via_prefill(ids) for _ in range(5)]
            b = [await via_decode(ids) for _ in range(5)]
            rows.append(
                {
                    "tokens": n,
                    "via_prefill_next_s": round(statistics.median(x[0] for x in a), 4),
                    "via_prefill_then_s": round(statistics.median(x[1] for x in a), 4),
                    "via_decode_next_s": round(statistics.median(x[0] for x in b), 4),
                    "via_decode_then_s": round(statistics.median(x[1] for x in b), 4),
                }
            )
        ids = [rng.randrange(5, 500) for _ in range(1536)]
        stall = {
            "neighbour_stall_via_prefill_s": round(await stall_of_a_neighbour(via_prefill, ids), 4),
            "neighbour_stall_via_decode_s": round(await stall_of_a_neighbour(via_decode, ids), 4),
        }
    finally:
        await prefill.close()
        await decode.close()
    print(json.dumps({"resume_cost": rows, **stall}))
    assert all(r["via_prefill_next_s"] < 30 and r["via_decode_next_s"] < 30 for r in rows)


async def test_prefill_worker_lost_between_requests(stack: Stack) -> None:
    """A prefill worker SIGKILLed while idle: until the router notices, a request may still pick it; that
    request is retried on the other prefill worker, and none fails."""
    stack.ensure("prefill-0")
    stack.ensure("prefill-1")
    stack.kill("prefill-1")
    client = openai.AsyncOpenAI(base_url=stack.serve.base_url, api_key="none", max_retries=0, timeout=60)
    try:
        for i in range(4):
            reply = await client.completions.create(
                model=stack.serve.model, prompt=f"once more {i}", max_tokens=4, temperature=0
            )
            assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    finally:
        await client.close()
    assert stack.health()["workers"]["prefill"][stack.workers["prefill-1"][1]]["healthy"] is False
    stack.ensure("prefill-1")


async def test_prefill_killed_holding_unclaimed_kv(stack: Stack, engine: Any) -> None:
    """Decode workers paused, prefill-0 publishes KV then dies before anyone claims it: with the default
    failurePolicy `recompute` the decode workers recompute and the clients see nothing."""
    stack.ensure("decode-0")
    stack.ensure("decode-1")
    prompts = PROMPTS[:8]
    refs = _greedy_references(stack, engine, prompts)
    failures_before = stack.worker_metric_sum("decode", "kvrelay_kv_transfer_failures_total")
    before = stack.first_tokens()
    for name in ("decode-0", "decode-1"):
        stack.kill(name, signal.SIGSTOP)
    try:
        # Keep the pause under the router's 2 s readiness timeout, or it would mark both decode workers down.
        def kill_prefill(_: dict[str, int]) -> None:
            stack.kill("prefill-0")
            time.sleep(0.3)
            for name in ("decode-0", "decode-1"):
                stack.kill(name, signal.SIGCONT)

        # Once every prefill answered (its KV published), whether or not its first token had text.
        outcomes, _ = await _streams(
            stack, prompts, kill=kill_prefill, kill_when=lambda: stack.first_tokens() >= before + 8
        )
    finally:
        for name in ("decode-0", "decode-1"):
            stack.kill(name, signal.SIGCONT)
    assert [o.error for o in outcomes] == [None] * 8
    _check_greedy(stack.tokenizer, refs, [o.text for o in outcomes])
    # The KV of the requests prefill-0 held could not be read: that is what the decode workers recomputed.
    failures = stack.worker_metric_sum("decode", "kvrelay_kv_transfer_failures_total") - failures_before
    assert failures > 0
    kv_empty_s = _assert_no_kv_leaked(stack)
    print(json.dumps({"kv_transfer_failures": failures, "kv_empty_after_s": round(kv_empty_s, 2)}))


async def test_both_decode_workers_lost_then_one_back(stack: Stack) -> None:
    """No decode worker left: streams end with a clear error within ERROR_BOUND_S; then serving resumes."""
    stack.ensure("decode-0")
    stack.ensure("decode-1")

    def kill_both(_: dict[str, int]) -> None:
        stack.kill("decode-0")
        stack.kill("decode-1")

    # Every stream must still run at the kill: each must end with the error. No reference to compute,
    # so the longest streams the tiny model takes.
    outcomes, killed_at = await _streams(
        stack, PROMPTS[:8], kill=kill_both, max_tokens=1900, all_running=True
    )
    for o in outcomes:
        assert o.error is not None and "no ready decode worker to resume" in o.error, o
        assert o.ended_at - killed_at < ERROR_BOUND_S
    print(json.dumps({"last_error_after_kill_s": round(max(o.ended_at for o in outcomes) - killed_at, 4)}))
    client = openai.OpenAI(base_url=stack.serve.base_url, api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError, match="no ready decode worker"):
        client.completions.create(model=stack.serve.model, prompt="anyone?", max_tokens=8)
    stack.ensure("decode-0")
    reply = client.completions.create(
        model=stack.serve.model, prompt="back again", max_tokens=8, temperature=0
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8


def test_a_worker_back_on_its_address_after_a_long_outage_is_taken_back_at_once(stack: Stack) -> None:
    """A prefill worker gone for 30 s, then started again on the same address (`kvrelay serve`, or a pod
    that keeps its IP), is routed to within seconds of being ready (measured 1.7 s with the router's 2 s
    reconnect cap, 3.9 s here without it; the cap bounds the worst case, which this setup did not reach)."""
    stack.kill("prefill-1")
    time.sleep(OUTAGE_S)
    assert not stack.health()["workers"]["prefill"][stack.workers["prefill-1"][1]]["healthy"]
    taken_back_s = stack.ensure("prefill-1")
    assert taken_back_s is not None and taken_back_s < 10.0, taken_back_s
    client = openai.OpenAI(base_url=stack.serve.base_url, api_key="none", max_retries=0, timeout=60)
    for i in range(4):  # both prefill workers serve again (least-loaded routing spreads 4 requests)
        reply = client.completions.create(model=stack.serve.model, prompt=f"back {i}", max_tokens=4)
        assert reply.usage.completion_tokens == 4


def test_serve_stops_without_waiting_for_an_open_stream(stack: Stack) -> None:
    """Ctrl-C (SIGTERM) of `kvrelay serve` while a client still streams: it stops at once, not after the
    generation (its workers' drain is cut short: nobody is left to read what they would keep)."""
    client = openai.OpenAI(base_url=stack.serve.base_url, api_key="none", max_retries=0, timeout=60)
    stream = iter(
        client.completions.create(model=stack.serve.model, prompt="long", max_tokens=1900, stream=True)
    )
    next(stream)
    started = time.monotonic()
    code = stop_process(stack.serve.proc, grace_s=30)
    assert time.monotonic() - started < 25, "serve waited for an open stream before stopping"
    assert code in (0, 130, -signal.SIGTERM)


async def test_prefill_killed_holding_unclaimed_kv_with_policy_fail(tmp_path: Path) -> None:
    """kvTransfer failurePolicy `fail`: the requests whose KV died with prefill-0 get a clear error at once,
    the others finish."""
    args = ["--model", "tiny", "--prefill", "2", "--decode", "1", "--kv-backend", "tcp"]
    with run_serve([*args, "--worker-arg=--kv-failure-policy=fail"], tmp_path) as serve:
        s = Stack.of(serve)
        before = s.first_tokens()
        s.kill("decode-0", signal.SIGSTOP)

        def kill_prefill(_: dict[str, int]) -> None:
            s.kill("prefill-0")
            time.sleep(0.3)
            s.kill("decode-0", signal.SIGCONT)

        try:
            outcomes, killed_at = await _streams(
                s, PROMPTS[:8], kill=kill_prefill, kill_when=lambda: s.first_tokens() >= before + 8
            )
        finally:
            s.kill("decode-0", signal.SIGCONT)
            s.close()
    failed = [o for o in outcomes if o.error is not None]
    assert 0 < len(failed) < 8, outcomes  # prefill-0 held some of the KV, prefill-1 the rest
    for o in failed:
        assert "KV transfer failed" in o.error and o.ended_at - killed_at < ERROR_BOUND_S, o
    assert all(o.finish == "length" for o in outcomes if o.error is None)
