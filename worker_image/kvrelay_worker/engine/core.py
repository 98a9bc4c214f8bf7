"""The engine: scheduler + model runner + paged KV cache, driven one ``step(now)`` at a time.

Synchronous and single-threaded; the server runs it on its own thread (``server/engine_loop.py``).
APIs the server and the KV relay use:
- ``add_request(..., prefill_only=True)``: prefill role; the first token comes back with the block
  ids holding the prompt's KV, kept allocated until ``release``.
- ``add_decode_request(..., remote_kv=True)``: decode role; the engine allocates blocks and reports them as a
  ``KVTarget`` so the relay can read the prompt's KV into them, then ``remote_kv_done(ok)``.
  ``ok=False`` (or an empty handle) recomputes the prompt locally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from kvrelay_worker.engine.grammar import GrammarCompiler, GrammarRefused
from kvrelay_worker.engine.paged_attention import allocate_kv_cache
from kvrelay_worker.engine.request import Request, RequestStatus
from kvrelay_worker.engine.runner import ModelRunner
from kvrelay_worker.engine.sampling_params import SamplingParams
from kvrelay_worker.engine.scheduler import (
    KVTarget,
    RequestOutput,
    RequestRefused,
    Scheduler,
    SchedulerConfig,
)
from kvrelay_worker.model.llama import LlamaForCausalLM
from kvrelay_worker.model.loader import load_model
from kvrelay_worker.model.parallel import SINGLE, TensorParallel


class EngineConfig(BaseModel):
    """Engine sizing; the worker's command-line flags map onto these fields."""

    num_blocks: int = Field(512, ge=2, description="KV blocks in the cache, block 0 included (reserved)")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    max_num_seqs: int = Field(64, ge=1, description="running sequences at most (decode batch)")
    max_batch_tokens: int = Field(2048, ge=1, description="tokens computed per step at most")
    max_model_len: int | None = Field(None, ge=2, description="default: the model's max_position_embeddings")
    device: str = "cpu"
    dtype: str | None = Field(None, description="float32 | bfloat16 | float16; default by device")
    enable_prefix_caching: bool = Field(True, description="keep and reuse the KV of full prompt blocks")
    cache_salt: str = Field("", description="extra key in every block hash (the dtype is always in it)")


@dataclass(frozen=True)
class EngineStats:
    """Gauges the worker exports after every step."""

    num_running: int
    num_waiting: int
    num_queued_prefill_tokens: int
    kv_cache_usage: float
    num_held: int
    # prefix cache: blocks registered (in use or free); since start: evictions, tokens looked up, hits
    num_cached_blocks: int = 0
    num_cache_evictions: int = 0
    num_cache_query_tokens: int = 0
    num_cache_hit_tokens: int = 0


@dataclass
class StepResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    kv_targets: list[KVTarget] = field(default_factory=list)
    num_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens this step computed (KV read from a relay excluded)


class Engine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        eos_token_ids: list[int] | None = None,
        detokenize=None,
        tokenizer_json: Path | None = None,
    ) -> None:
        self.model = model
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = min(config.max_model_len or model.max_model_len, model.max_model_len)
        self.kv_cache = allocate_kv_cache(
            model.config,
            config.num_blocks,
            config.block_size,
            self.dtype,
            self.device,
            model.num_kv_heads_local,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=config.num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_batch_tokens=config.max_batch_tokens,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                cache_salt=f"{config.cache_salt}|{self.dtype}",
            ),
            eos_token_ids if eos_token_ids is not None else model.config.eos_token_id,
            detokenize,
        )
        self.runner = ModelRunner(model, self.kv_cache, config.block_size, self.scheduler.eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer_json, model.config.vocab_size, self.scheduler.eos_token_ids)

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: EngineConfig, tp: TensorParallel = SINGLE) -> Engine:
        """Load a checkpoint directory (this rank's shard with ``tp``); EOS ids from config +
        generation_config; detokenizer if present."""
        dtype = getattr(torch, config.dtype) if config.dtype else None
        model = load_model(model_dir, config.device, dtype, config.max_model_len, tp)
        eos = set(model.config.eos_token_id)
        gen_cfg = Path(model_dir) / "generation_config.json"
        if gen_cfg.is_file():
            raw = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos.update([raw] if isinstance(raw, int) else (raw or []))
        detokenize = None
        tok_file = Path(model_dir) / "tokenizer.json"
        if tok_file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))

            def detokenize(ids: list[int]) -> str:
                return tok.decode(ids[-32:])  # stop strings only need the recent tail

        return cls(model, config, sorted(eos), detokenize, tok_file if tok_file.is_file() else None)

    # ---- request API ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        now: float,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request; raises RequestRefused if it can never fit or its params don't fit the model."""
        self._check_vocab(prompt_token_ids)
        self._check_params(params, len(prompt_token_ids))
        request = Request(request_id, list(prompt_token_ids), params, now, prefill_only=prefill_only)
        request.matcher = self._matcher(params, prompt_token_ids, [])
        self.scheduler.add_request(request)

    def add_decode_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        params: SamplingParams,
        now: float,
        *,
        remote_kv: bool,
    ) -> None:
        """Queue a request that goes on after a first token sampled by a prefill worker.

        remote_kv: the prompt's KV comes from elsewhere (see ``StepResult.kv_targets``); otherwise
        the prompt and first token are recomputed here.
        """
        self._check_vocab([*prompt_token_ids, first_token])
        self._check_params(params, len(prompt_token_ids))
        if params.prompt_logprobs is not None:  # the prompt was scored where it was prefilled
            raise RequestRefused("prompt_logprobs is answered by the prefill model only")
        request = Request(request_id, list(prompt_token_ids), params, now, output_token_ids=[first_token])
        request.matcher = self._matcher(params, prompt_token_ids, [first_token])
        if remote_kv:
            self.scheduler.add_remote_request(request)
        else:
            self.scheduler.add_request(request)

    def remote_kv_done(self, request_id: str, ok: bool) -> None:
        self.scheduler.remote_kv_done(request_id, ok)

    def release(self, request_id: str) -> bool:
        """Free the KV blocks a prefill-only request holds for its reader."""
        return self.scheduler.release(request_id)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def _matcher(self, params: SamplingParams, prompt: list[int], outputs: list[int]) -> object | None:
        """The grammar's matcher, fed what the request generated so far: the last ``output_offset`` prompt
        tokens (a resumed request's earlier output) and ``outputs``. None without a grammar."""
        if params.grammar is None:
            return None
        earlier = prompt[len(prompt) - params.output_offset :] if params.output_offset else []
        try:
            return self.grammars.matcher(params.grammar, [*earlier, *outputs])
        except GrammarRefused as exc:
            raise RequestRefused(str(exc)) from None

    def _check_vocab(self, token_ids: list[int]) -> None:
        vocab = self.model.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestRefused(f"token ids {bad[:5]} outside the vocabulary [0, {vocab})")

    def _check_params(self, params: SamplingParams, num_prompt_tokens: int) -> None:
        """What SamplingParams can't check alone: logit_bias ids and top-logprobs counts against the
        vocabulary, output_offset against the prompt (whose last output_offset tokens are earlier outputs)."""
        vocab = self.model.config.vocab_size
        bad = sorted(t for t in params.logit_bias if t >= vocab)
        if bad:
            raise RequestRefused(f"logit_bias token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        top = max(params.logprobs or 0, params.prompt_logprobs or 0)
        if top > vocab:
            raise RequestRefused(f"{top} top logprobs asked of a vocabulary of {vocab}")
        if params.output_offset > num_prompt_tokens:
            raise RequestRefused(
                f"output_offset {params.output_offset} exceeds the prompt's {num_prompt_tokens} tokens"
            )

    # ---- the loop -------------------------------------------------------------------------------
    def step(self, now: float) -> StepResult:
        """Schedule, run the model, apply results: one iteration of continuous batching."""
        out = self.scheduler.schedule(now)
        sampled, logprobs = self.runner.execute(out)
        outputs = self.scheduler.update(out, sampled, logprobs)
        return StepResult(outputs, out.kv_targets, out.num_tokens, out.num_prompt_tokens)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting) + len(s.pending_remote) + len(s.fetching),
            num_queued_prefill_tokens=s.num_queued_prefill_tokens,
            kv_cache_usage=s.pool.usage,
            num_held=s.num_held,
            num_cached_blocks=s.pool.num_cached_blocks,
            num_cache_evictions=s.pool.num_evictions,
            num_cache_query_tokens=s.num_cache_query_tokens,
            num_cache_hit_tokens=s.num_cache_hit_tokens,
        )

    def status(self, request_id: str) -> RequestStatus | None:
        request = self.scheduler.requests.get(request_id)
        return request.status if request else None

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Convenience for tests and benchmarks: run prompts to completion, return output tokens."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {i: [] for i in ids}
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p, now=0.0)
        while self.has_work():
            for o in self.step(now=0.0).outputs:
                results[o.request_id].extend(o.new_token_ids)
        return [results[i] for i in ids]
