"""Per-request sampling parameters: the JSON the router sends in the ``sampling`` input."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# logit_bias keys are token ids (JSON object keys, so decimal strings on the wire); the upper bound is
# the model's vocabulary, which only the engine knows (``Engine.add_request`` refuses ids past it)
TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class SamplingParams(BaseModel):
    """Sampling and stopping controls of one request (wire contract section 3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="generated tokens at most, the first one included")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 means no top-k filtering")
    seed: int | None = Field(None, description="per-request seed; the same seed gives the same tokens")
    stop_token_ids: list[int] = Field(default_factory=list)
    stop: list[str] = Field(
        default_factory=list, description="stop strings (needs a tokenizer in the worker)"
    )
    ignore_eos: bool = False
    output_offset: int = Field(
        0,
        ge=0,
        description="tokens this request generated before this call (a resumed request): seeded draws "
        "go on from that output index, so a resume draws what the uninterrupted run would have",
    )
    presence_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="OpenAI: subtracted once from each generated token's logit",
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="OpenAI: subtracted per time a token was generated",
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="vLLM/transformers: a prompt or generated token's logit is divided by it if positive, "
        "else multiplied; 1 means off",
    )
    logit_bias: dict[TokenId, Bias] = Field(
        default_factory=dict, description="token id -> bias added to its logit (OpenAI: -100..100)"
    )
    min_tokens: int = Field(
        0,
        ge=0,
        description="EOS and stop_token_ids cannot be sampled (nor stop strings match) until this many "
        "tokens were generated, the output_offset ones included (the original request's value)",
    )

    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="per generated token: its logprob and this many top alternatives (log_softmax of the "
        "raw logits, before every transform); None means off",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="prefill only: each prompt token's logprob after the first, given the ones before it, "
        "and this many top alternatives; None means off",
    )

    grammar: str | None = Field(
        None,
        description="an llguidance grammar (JSON, as LLMatcher.grammar_from_json_schema/_regex/_lark write "
        "it): every sampled token is masked to what it allows, the first one on the prefill worker",
    )

    @model_validator(mode="after")
    def _grammar_can_end(self) -> SamplingParams:
        # a finished grammar allows only EOS: a request that ignores EOS could never end inside it
        if self.grammar is not None and self.ignore_eos:
            raise ValueError("grammar and ignore_eos cannot be combined: the grammar ends on EOS")
        return self

    @model_validator(mode="after")
    def _min_within_max(self) -> SamplingParams:
        # on a resume max_tokens is what is left but min_tokens the original: compare with the whole budget
        if self.min_tokens > self.output_offset + self.max_tokens:
            raise ValueError(
                f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}"
                + (f" + output_offset {self.output_offset}" if self.output_offset else "")
            )
        return self

    @property
    def greedy(self) -> bool:
        """Argmax of the (transformed) logits: no draw."""
        return self.temperature == 0.0 or self.top_k == 1

    @cached_property
    def transforms_logits(self) -> bool:
        """Any of logit_bias, min_tokens or the penalties set: the sampler changes the logits first."""
        # cached: the sampler asks for every row of every step (a fifth of the cost of the plain check)
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
        )

    @property
    def wants_logprobs(self) -> bool:
        """``logprobs`` or ``prompt_logprobs`` set: the runner scores these rows beyond the draw."""
        return self.logprobs is not None or self.prompt_logprobs is not None

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> SamplingParams:
        """pydantic's copy, without the cached ``transforms_logits`` (``update`` may change its inputs)."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("transforms_logits", None)
        return copied
