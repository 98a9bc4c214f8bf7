"""Everything needed to continue one request on another worker: the router owns the request, workers don't.

A request is the prompt plus the tokens generated so far. Any worker can go on from there: a prefill
worker computes the KV of prompt + generated tokens and samples the next one (then a decode worker reads
that KV), or a decode worker recomputes it. The text side (incremental detokenizer, stop-string matcher)
never leaves the router, so the client's text goes on exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrelay_worker.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class ResumeState:
    """One request's state across workers.

    `sampling` is the `SamplingParams` JSON as first sent (whole `max_tokens` budget, seed); every call
    derives its own from it and the tokens generated so far. Penalty state needs nothing more: a worker
    counts the `output_offset` trailing input tokens as generated. Grammar state would go here too.
    `logprobs` is asked of every call (each reports the tokens it samples), `prompt_logprobs` only of
    the first prefill: a resume's input holds generated tokens, whose logprobs the client already has.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: dict[str, Any]
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    eos_ids: frozenset[int]
    # generated tokens the router accepted, in order; their text went to the client or is held back
    # by the detokenizer (an incomplete character) or the stop matcher (a possible stop string)
    generated_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length once a worker ended the request
    migrations: int = 0
    last_failure: str | None = None
    logprobs: int | None = None  # top alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # top alternatives per prompt token (echo); None: none

    @classmethod
    def start(
        cls,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: dict[str, Any],
        tokenizer: Tokenizer,
        stop: Sequence[str],
    ) -> ResumeState:
        eos = frozenset() if sampling.get("ignore_eos") else frozenset(tokenizer.eos_token_ids)
        base = dict(sampling)
        logprobs, prompt_logprobs = base.pop("logprobs", None), base.pop("prompt_logprobs", None)
        return cls(
            request_id,
            list(prompt_ids),
            base,
            IncrementalDetokenizer(tokenizer),
            StopStringMatcher(stop),
            eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    @property
    def position(self) -> int:
        """Output index of the next token to generate (what its seeded draw depends on)."""
        return len(self.generated_ids)

    @property
    def max_tokens_left(self) -> int:
        return int(self.sampling["max_tokens"]) - len(self.generated_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.stop.stopped or self.max_tokens_left <= 0

    def _sampling_from(self, offset: int) -> dict[str, Any]:
        params = {**self.sampling, "max_tokens": int(self.sampling["max_tokens"]) - offset}
        if offset:  # sent only when set: a worker that predates the field still takes fresh requests
            params["output_offset"] = offset
        if self.logprobs is not None:  # likewise
            params["logprobs"] = self.logprobs
        return params

    def prefill_inputs(self) -> tuple[list[int], dict[str, Any]]:
        """(input_ids, sampling) for a prefill worker: it samples the token at `position`."""
        params = self._sampling_from(self.position)
        if self.prompt_logprobs is not None and not self.generated_ids:
            params["prompt_logprobs"] = self.prompt_logprobs
        return self.prompt_ids + self.generated_ids, params

    def decode_inputs(self) -> tuple[list[int], int, dict[str, Any]]:
        """(input_ids, first_token, sampling) for a decode worker going on after the last generated token."""
        if not self.generated_ids:
            raise ValueError("a decode call needs one generated token (the prefill's)")
        *before, last = self.generated_ids
        return self.prompt_ids + before, last, self._sampling_from(len(before))

    def advance(self, token_id: int | None, finish_reason: str | None) -> str:
        """Accept one generated token (None: a final response without one); return the text to send now."""
        if finish_reason is not None:
            self.finish_reason = finish_reason
        if token_id is None:
            return ""
        self.generated_ids.append(token_id)
        if finish_reason == "stop" and token_id in self.eos_ids:
            return ""  # the EOS token ends the text; it is not part of it
        text = self.detokenizer.push(token_id)
        if len(self.generated_ids) < int(self.sampling.get("min_tokens", 0)):
            return text  # as vLLM: no stop string ends a request before min_tokens tokens
        return self.stop.feed(text)

    def tail(self) -> str:
        """At the end: the text held back (an incomplete character, a stop-string prefix that wasn't)."""
        return self.stop.feed(self.detokenizer.flush()) + self.stop.flush()

    def final_reason(self) -> str:
        """The OpenAI finish reason: a matched stop string wins; a used-up budget is `length`."""
        if self.stop.stopped:
            return "stop"
        return self.finish_reason or "length"
