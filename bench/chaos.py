"""Chaos: open-loop streaming load on 2 prefill + 2 decode workers (tiny model) while workers are killed.

The bench starts the workers itself (each on fixed grpc/metrics/KV ports) and a router with static
discovery, so a killed worker can be restarted on the same address and the router's readiness checks
take it back. Two phases of ``--duration`` seconds each, the same seeded Poisson arrivals (``--rate``
per second) in both, alternating in ``--rounds`` rounds (baseline, chaos, baseline, chaos, ...) so
that a machine whose background load drifts weighs on both alike:

- baseline: no kills;
- chaos: every ``--kill-every`` seconds a random worker (seeded RNG) gets SIGKILL, then SIGTERM, in
  turn, and is restarted on its ports once it has exited. A SIGTERMed worker drains and must exit 0.
  A kill never takes the last live worker of a role (the router needs one of each to serve at all;
  losing both decode workers is tests/e2e/test_migration.py's case), so such a pick is skipped.

Every request: the official ``openai`` async client, ``completions`` stream=True, temperature 0,
``ignore_eos``, ``--max-tokens`` tokens, a prompt from a fixed set. TTFT: sent -> first chunk; ITL:
gaps between chunks. Every completed text is compared token-exact with the single-process engine's
greedy output; a first difference where the engine's top-2 logit margin is below NEAR_TIE is counted
as a near-tie (shared/notes/token-equality.md), any other as a mismatch.

Prints one JSON line; exits 1 if a request failed, a text mismatched, or a drained worker exited non-zero.

    python bench/chaos.py [--duration 90] [--rounds 3] [--rate 2] [--kill-every 10] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from kvrelay_worker.model_store import ensure_tiny_model
from kvrelay_worker.ports import free_ports
from kvrelay_worker.processes import stop_process
from kvrelay_worker.tokenizer import Tokenizer
from router_common import quantile

MODEL_NAME = "tiny"
# tests/e2e/test_migration.py measured the tiny model's logit noise between a full recompute and an
# incremental one at 5e-6; a first difference below 20x that is a legitimate arg-max flip.
NEAR_TIE = 1e-4
PROMPTS = [f"Numbers such as {i} appear in logs, question {i * 7}" for i in range(8)]
READY_TIMEOUT_S = 180.0
DRAIN_SECONDS = 60.0  # a SIGTERMed worker's drain bound; streams are far shorter than this
SHOW = 5  # failures / mismatches listed in the JSON line


@dataclass
class Worker:
    name: str
    role: str
    ports: tuple[int, int, int]  # grpc, metrics, kv
    log_dir: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    restarting: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.log"

    def command(self, model_dir: Path) -> list[str]:
        grpc, metrics, kv = self.ports
        return [
            sys.executable, "-m", "kvrelay_worker.entrypoint", "--role", self.role, "--model", str(model_dir),
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--grpc-port", str(grpc),
            "--metrics-port", str(metrics), "--kv-port", str(kv), "--kv-backend", "tcp", "--threads", "1",
            "--drain-seconds", str(DRAIN_SECONDS),
        ]  # fmt: skip

    def spawn(self, model_dir: Path) -> None:
        self.starts += 1
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            # Own session: a Ctrl-C on the bench must not SIGINT the workers behind its back.
            self.proc = subprocess.Popen(
                self.command(model_dir), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )  # fmt: skip

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, model_dir: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until the worker printed READY; respawns when its port is still held (TIME_WAIT)."""
        deadline = time.monotonic() + timeout_s
        retries = 5
        while True:
            assert self.proc is not None
            text = self.log_tail(200)
            if "READY role=" in text:
                return
            if self.proc.poll() is not None:
                if retries and ("Address already in use" in text or "Failed to bind" in text):
                    retries -= 1
                    time.sleep(1.0)
                    self.spawn(model_dir)
                    continue
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{text}")
            time.sleep(0.1)


@dataclass
class Result:
    prompt: int
    sent_at: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None


@dataclass
class Reference:
    text: str
    tokens: list[int]
    margins: list[float]  # the engine's top-2 logit margin at every generated step


def references(model_dir: Path, tokenizer: Tokenizer, max_tokens: int) -> list[Reference]:
    """Greedy outputs and margins from the single-process engine (torch imported here only)."""
    import torch
    from kvrelay_worker.engine.core import Engine, EngineConfig
    from kvrelay_worker.engine.sampling_params import SamplingParams

    engine = Engine.from_dir(model_dir, EngineConfig())
    ids = [tokenizer.encode(p) for p in PROMPTS]
    outs = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    refs = []
    with torch.no_grad():
        for prompt, out in zip(ids, outs, strict=True):
            logits = engine.model.full_forward_logits(torch.tensor([prompt + out]))[0, len(prompt) - 1 : -1]
            top = torch.topk(logits.float(), 2, dim=-1).values
            refs.append(Reference(tokenizer.decode(out), out, (top[:, 0] - top[:, 1]).tolist()))
    return refs


def first_difference(tokenizer: Tokenizer, ref: Reference, text: str) -> int | None:
    """The first generated step whose token the text does not carry (None: the text is a longer one)."""
    return next(
        (k for k in range(len(ref.tokens)) if not text.startswith(tokenizer.decode(ref.tokens[: k + 1]))),
        None,
    )


class Stack:
    """2 prefill + 2 decode workers on fixed ports and a router with static discovery."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        roles = ["prefill", "prefill", "decode", "decode"]
        ports = free_ports(3 * len(roles) + 1)
        self.workers = [
            Worker(f"{role}-{i % 2}", role, tuple(ports[3 * i : 3 * i + 3]), log_dir)  # type: ignore[arg-type]
            for i, role in enumerate(roles)
        ]
        self.port = ports[-1]
        self.router: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for w in self.workers:  # all at once: their torch imports overlap
            w.spawn(self.model_dir)
        for w in self.workers:
            w.wait_ready(self.model_dir)
        addresses = {
            role: ",".join(w.address for w in self.workers if w.role == role)
            for role in ("prefill", "decode")
        }
        with (self.log_dir / "router.log").open("wb") as log:
            self.router = subprocess.Popen(
                [sys.executable, "-m", "kvrelay_worker.router", "--model", str(self.model_dir),
                 "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                 "--prefill", addresses["prefill"], "--decode", addresses["decode"],
                 "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.all_healthy():
            if self.router.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "router did not see every worker:\n" + (self.log_dir / "router.log").read_text()
                )
            time.sleep(0.2)

    def health(self) -> dict[str, dict[str, Any]]:
        try:
            return httpx.get(self.root + "/health", timeout=5).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}

    def all_healthy(self) -> bool:
        workers = self.health()
        return all(workers.get(w.role, {}).get(w.address, {}).get("healthy") for w in self.workers)

    def metric_by_label(self, name: str) -> dict[str, float]:
        """Samples of one router counter, keyed by their `reason` label."""
        text = httpx.get(self.root + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                reason = labels.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in labels else ""
                out[reason] = out.get(reason, 0.0) + float(value)
        return out

    def stop(self) -> None:
        if self.router is not None:
            stop_process(self.router, grace_s=15)
        for w in self.workers:
            if w.proc is not None:
                stop_process(w.proc, grace_s=15)


async def one_request(client: openai.AsyncOpenAI, prompt: int, max_tokens: int) -> Result:
    r = Result(prompt, time.perf_counter())
    parts: list[str] = []
    last = 0.0
    try:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=PROMPTS[prompt], max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if not chunk.choices:
                continue
            now = time.perf_counter()
            # Any chunk counts: the detokenizer may hold back text while a random model's bytes are not UTF-8.
            if r.ttft is None:
                r.ttft = now - r.sent_at
            else:
                r.gaps.append(now - last)
            last = now
            parts.append(chunk.choices[0].text)
            r.finish = chunk.choices[0].finish_reason or r.finish
    except openai.APIError as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    r.text = "".join(parts)
    if r.error is None and r.finish != "length":
        r.error = f"stream ended with finish_reason={r.finish!r}"
    return r


async def load(
    client: openai.AsyncOpenAI, arrivals: list[float], max_tokens: int, in_flight: list[int]
) -> list[Result]:
    """Send one request at each arrival offset (seconds), open loop; wait for them all."""
    t0 = time.perf_counter()
    tasks = []

    async def tracked(i: int) -> Result:
        in_flight[0] += 1
        try:
            return await one_request(client, i % len(PROMPTS), max_tokens)
        finally:
            in_flight[0] -= 1

    for i, at in enumerate(arrivals):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        tasks.append(asyncio.create_task(tracked(i)))
    return list(await asyncio.gather(*tasks))


@dataclass
class Chaos:
    kills: dict[str, int] = field(default_factory=lambda: {"SIGKILL": 0, "SIGTERM": 0})
    skipped: int = 0
    exit_codes: dict[str, list[int]] = field(default_factory=lambda: {"SIGKILL": [], "SIGTERM": []})
    in_flight_at_kills: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    restarts: list[asyncio.Task] = field(default_factory=list)


async def chaos_loop(
    stack: Stack, rng: random.Random, duration: float, every: float, in_flight: list[int], chaos: Chaos
) -> None:
    t0 = time.perf_counter()
    sigs = [signal.SIGKILL, signal.SIGTERM]
    k = 1
    while k * every < duration:
        await asyncio.sleep(max(0.0, t0 + k * every - time.perf_counter()))
        k += 1
        health = await asyncio.to_thread(stack.health)

        def healthy(w: Worker, h: dict[str, dict[str, Any]] = health) -> bool:
            return not w.restarting and bool(h.get(w.role, {}).get(w.address, {}).get("healthy"))

        # Only a worker whose role keeps another healthy worker: see the module docstring.
        candidates = [
            w for w in stack.workers
            if healthy(w) and any(healthy(o) for o in stack.workers if o.role == w.role and o is not w)
        ]  # fmt: skip
        if not candidates:
            chaos.skipped += 1
            continue
        victim = rng.choice(candidates)
        sig = sigs[sum(chaos.kills.values()) % 2]
        assert victim.proc is not None
        victim.restarting = True
        chaos.in_flight_at_kills.append(in_flight[0])
        chaos.kills[sig.name] += 1
        chaos.log.append(f"{time.perf_counter() - t0:.1f}s {sig.name} {victim.name} in_flight={in_flight[0]}")
        victim.proc.send_signal(sig)
        chaos.restarts.append(asyncio.create_task(asyncio.to_thread(restart, stack, victim, sig.name, chaos)))


def restart(stack: Stack, w: Worker, sig: str, chaos: Chaos) -> None:
    """Wait for the killed worker to exit (a drain may take a while), record its code, start it again."""
    assert w.proc is not None
    try:
        code = w.proc.wait(timeout=DRAIN_SECONDS + 30)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        code = w.proc.wait()
        chaos.log.append(f"{w.name} did not exit after {sig}; SIGKILLed")
    chaos.exit_codes[sig].append(code)
    w.spawn(stack.model_dir)
    w.wait_ready(stack.model_dir)
    w.restarting = False


def figures(results: list[Result], refs: list[Reference], tokenizer: Tokenizer, t0: float) -> dict[str, Any]:
    """Latency quantiles and correctness counts of one phase (`t0`: its start, for request times)."""
    ttft = [r.ttft for r in results if r.error is None and r.ttft is not None]
    gaps = [g for r in results if r.error is None for g in r.gaps]
    failures, mismatches, near_ties = [], [], []
    for i, r in enumerate(results):
        if r.error is not None:
            at = round(r.sent_at - t0, 1)
            failures.append({"request": i, "prompt": r.prompt, "sent_at_s": at, "error": r.error[:300]})
            continue
        ref = refs[r.prompt]
        if r.text == ref.text:
            continue
        step = first_difference(tokenizer, ref, r.text)
        margin = None if step is None else ref.margins[step]
        at = round(r.sent_at - t0, 1)
        entry = {
            "request": i,
            "prompt": r.prompt,
            "sent_at_s": at,
            "first_diff_token": step,
            "margin": margin,
        }
        (near_ties if margin is not None and margin < NEAR_TIE else mismatches).append(entry)

    def ms(values: list[float], q: float) -> float | None:
        return round(quantile(values, q) * 1e3, 2) if values else None

    return {
        "sent": len(results),
        "completed": len(results) - len(failures),
        "failed": len(failures),
        "mismatched": len(mismatches),
        "near_ties": len(near_ties),
        "ttft_p50_ms": round(statistics.median(ttft) * 1e3, 2) if ttft else None,
        "ttft_p99_ms": ms(ttft, 0.99),
        "itl_p50_ms": round(statistics.median(gaps) * 1e3, 2) if gaps else None,
        "itl_p99_ms": ms(gaps, 0.99),
        "itl_max_ms": round(max(gaps) * 1e3, 2) if gaps else None,
        "failures": failures[:SHOW],
        "mismatches": mismatches[:SHOW],
        "near_tie_list": near_ties[:SHOW],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


async def run(args: argparse.Namespace, stack: Stack, refs: list[Reference], tokenizer: Tokenizer) -> dict:
    rng = random.Random(args.seed)
    segment = args.duration / args.rounds
    arrivals, t = [], rng.expovariate(args.rate)
    while t < segment:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    client = openai.AsyncOpenAI(base_url=stack.root + "/v1", api_key="none", timeout=300, max_retries=0)
    in_flight = [0]
    baseline: list[Result] = []
    results: list[Result] = []
    rounds: list[dict[str, Any]] = []
    base_migrations: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    migration_failures: dict[str, int] = {}
    chaos = Chaos()
    chaos_wall = 0.0

    def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
        return {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}

    def add(total: dict[str, int], more: dict[str, int]) -> None:
        for k, v in more.items():
            total[k] = total.get(k, 0) + v

    try:
        await asyncio.gather(*(one_request(client, i % len(PROMPTS), 8) for i in range(4)))  # warm-up
        t0 = time.perf_counter()
        # Baseline and chaos alternate, each with the same arrivals: the machine's background load
        # drifts over minutes, and one baseline before one chaos phase would compare two machines.
        for _ in range(args.rounds):
            migrations_0 = stack.metric_by_label("kvrelay_router_migrations_total")
            calm = await load(client, arrivals, args.max_tokens, in_flight)
            migrations_1 = stack.metric_by_label("kvrelay_router_migrations_total")
            failures_1 = stack.metric_by_label("kvrelay_router_migration_failures_total")
            started = time.perf_counter()
            killer = asyncio.create_task(chaos_loop(stack, rng, segment, args.kill_every, in_flight, chaos))
            killed = await load(client, arrivals, args.max_tokens, in_flight)
            await killer
            await asyncio.gather(*chaos.restarts)  # every worker back before the next baseline
            chaos_wall += time.perf_counter() - started
            add(base_migrations, delta(migrations_1, migrations_0))
            add(by_reason, delta(stack.metric_by_label("kvrelay_router_migrations_total"), migrations_1))
            add(
                migration_failures,
                delta(stack.metric_by_label("kvrelay_router_migration_failures_total"), failures_1),
            )
            calm_f, killed_f = figures(calm, refs, tokenizer, t0), figures(killed, refs, tokenizer, t0)
            rounds.append(
                {f"{k}_ratio": ratio(killed_f[f"{k}_ms"], calm_f[f"{k}_ms"]) for k in ("ttft_p50", "itl_p50")}
            )
            baseline += calm
            results += killed
    finally:
        await client.close()

    base = figures(baseline, refs, tokenizer, t0)
    base["migrations"] = sum(base_migrations.values())
    main = figures(results, refs, tokenizer, t0)
    return {
        "bench": "chaos",
        "quick": args.quick,
        "model": "tiny (random weights), 2 prefill + 2 decode workers, tcp KV, 1 thread each",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "chaos_wall_s": round(chaos_wall, 1),
        "rate_per_s": args.rate,
        "kill_every_s": args.kill_every,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "kills": chaos.kills,
        "kills_skipped": chaos.skipped,
        "in_flight_at_kills": chaos.in_flight_at_kills,
        **{k: main[k] for k in ("sent", "completed", "failed", "mismatched", "near_ties")},
        "migrations": sum(by_reason.values()),
        "migrations_by_reason": by_reason,
        "migration_failures": migration_failures,
        **{k: main[k] for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "itl_max_ms")},
        "baseline": {k: v for k, v in base.items() if k not in ("near_tie_list",)},
        "ttft_p50_ratio": ratio(main["ttft_p50_ms"], base["ttft_p50_ms"]),
        "ttft_p99_ratio": ratio(main["ttft_p99_ms"], base["ttft_p99_ms"]),
        "itl_p50_ratio": ratio(main["itl_p50_ms"], base["itl_p50_ms"]),
        "itl_p99_ratio": ratio(main["itl_p99_ms"], base["itl_p99_ms"]),
        # Each round's chaos phase against the baseline just before it (same arrivals, minutes apart).
        "round_ratios": rounds,
        "sigterm_exit_codes": chaos.exit_codes["SIGTERM"],
        "sigkill_exit_codes": chaos.exit_codes["SIGKILL"],
        "failures": main["failures"],
        "mismatches": main["mismatches"],
        "near_tie_list": main["near_tie_list"],
        "kill_log": chaos.log,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=90.0,
        help="seconds per phase, all rounds",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="baseline and chaos phases alternate this often"
    )
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson arrivals)")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument(
        "--max-tokens", type=int, default=1500, help="long enough that streams (~2 s) are running at kills"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 10 s phases, a kill every 3 s, 500 tokens"
    )
    args = parser.parse_args()
    if args.quick:  # streams of ~1 s still overlap every kill at 2 requests/s
        args.duration, args.kill_every, args.rounds, args.max_tokens = 10.0, 3.0, 1, 500
    if args.rounds < 1 or args.duration / args.rounds <= args.kill_every:
        parser.error("each round's chaos phase (--duration / --rounds) must be longer than --kill-every")
    model_dir = ensure_tiny_model()
    tokenizer = Tokenizer.from_dir(model_dir)
    with tempfile.TemporaryDirectory(prefix="kvrelay-chaos-") as tmp:
        stack = Stack(model_dir, Path(tmp))
        try:
            stack.start()
            refs = references(model_dir, tokenizer, args.max_tokens)
            out = asyncio.run(run(args, stack, refs, tokenizer))
        except BaseException:
            for w in stack.workers:
                print(f"--- {w.name} (start {w.starts}) ---\n{w.log_tail()}", file=sys.stderr)
            raise
        finally:
            stack.stop()
    print(json.dumps(out), flush=True)
    bad_drain = [c for c in out["sigterm_exit_codes"] if c != 0]
    sys.exit(1 if out["failed"] or out["mismatched"] or bad_drain else 0)


if __name__ == "__main__":
    main()
