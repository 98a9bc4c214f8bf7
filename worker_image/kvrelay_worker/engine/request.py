"""The request lifecycle: one ordered status enum, the mutable per-request record and its logprobs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kvrelay_worker.engine.sampling_params import SamplingParams
from kvrelay_worker.prefix_hash import BlockHash


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One position's log_softmax of the model's raw logits: the token there and the top alternatives.

    ``top_ids``/``top_logprobs`` hold the request's ``logprobs`` (or ``prompt_logprobs``) best tokens,
    highest first.
    """

    token_id: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


class RequestStatus(enum.IntEnum):
    """Ordered: every status from FINISHED_STOPPED on is finished."""

    WAITING = 0
    # decode role: queued for blocks, then the KV relay reads the prompt's KV into them
    # (``KVTarget``); ``remote_kv_done`` moves it on to WAITING, its prompt computed or not
    WAITING_FOR_REMOTE_KV = 1
    RUNNING = 2
    PREEMPTED = 3  # blocks taken back; recomputes from scratch when re-admitted
    SENDING_KV = 4  # prefill role: first token out, prompt KV held until the reader releases it
    FINISHED_STOPPED = 5
    FINISHED_LENGTH = 6
    FINISHED_ABORTED = 7

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass(eq=False, slots=True)  # identity equality: list membership must not compare token lists
class Request:
    """One sequence in the engine. Tokens are prompt + output; KV exists for ``num_computed_tokens``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    prefill_only: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    first_scheduled_time: float | None = None
    # params.prompt_logprobs: positions 0.. of the prompt scored so far (entry i is token i + 1). Only
    # grows: a preempted request recomputes its prompt but the runner skips the positions listed here
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # prefix cache: the chained hashes of the full blocks of prompt + output computed so far (tokens
    # never change, so they outlive preemption), and how many of ``block_ids`` are in the cache
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_registered_blocks: int = 0
    # params.grammar: the llguidance matcher, fed every output token (``engine/grammar.py``)
    matcher: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens in [start, end) of prompt + output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:  # decode: only output tokens, no copy of the prompt
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
