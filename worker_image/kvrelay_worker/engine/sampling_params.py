"""Per-request sampling parameters: the JSON the router sends in the ``sampling`` input."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
