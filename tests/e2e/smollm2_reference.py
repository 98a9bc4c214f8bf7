"""Hugging Face transformers as the independent reference for SmolLM2-135M-Instruct.

transformers reads the GGUF file itself (its own dequantization and Q/K un-permutation), so a
mistake in kvrelay's importer shows up as a logit difference, not as agreement with itself.

Token equality follows ``shared/notes/token-equality.md``: compare token by token; at the first
difference, accept it only when the reference's top-2 logit margin there is below NEAR_TIE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

# Logit noise between kvrelay and transformers in fp32, measured on the prompts of these tests:
# 2e-5 to 8e-5 max abs over whole vocabularies (1,000+ token prompts at the top). Logit
# tolerance is about 10x that; a mutation of the arithmetic (RoPE sign, RMSNorm eps, Q/K order)
# moves logits by 1e-2 to 10 and more.
LOGIT_TOL_FP32 = 1e-3
# A greedy difference is a near-tie only if the reference's top-2 margin is below this: twice
# the logit tolerance (each side may be off by the noise in opposite directions).
NEAR_TIE_FP32 = 2 * LOGIT_TOL_FP32

# Natural-language chat prompts that ask for long answers, so 64 tokens are mostly real text.
CHAT_PROMPTS = [
    "Write a short paragraph about the history of the bicycle.",
    "Explain how a refrigerator keeps food cold.",
    "Describe a walk through a forest in autumn.",
    "What are the main causes of the seasons on Earth?",
    "Give three tips for learning a new language.",
    "Explain what a database index is and why it helps.",
    "Write a short story about a lighthouse keeper and a storm.",
    "Why do cats purr? Answer in a few sentences.",
    "Describe how bread is made, step by step.",
    "What is photosynthesis? Explain it to a child.",
    "List some benefits of regular exercise.",
    "Explain the difference between weather and climate.",
    "Write a polite email asking a colleague for a meeting next week.",
    "How does a compass work?",
    "Summarize the plot of a typical detective novel.",
    "What should I pack for a weekend camping trip?",
]

# (question, a word transformers' greedy answer contains): capitals, arithmetic, common facts. A
# 135M model gets some questions wrong (Italy's capital, 5 + 7); those are left out, not tuned around.
FACTUAL_QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is 2 + 2?", "4"),
    ("What is 10 times 3?", "30"),
    ("What is 100 divided by 4?", "25"),
    ("How many days are there in a week?", "7"),
    ("What is the chemical symbol for water?", "H2O"),
]


@dataclass
class Greedy:
    """A reference greedy continuation with the top-2 logit margin at every step."""

    tokens: list[int]
    margins: list[float]
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)


@dataclass
class Verdict:
    """Outcome of comparing a generation with the reference."""

    exact: bool
    near_tie_at: int | None = None  # step of an accepted near-tie difference
    mismatch: str | None = None  # why the difference is not a near-tie

    @property
    def ok(self) -> bool:
        return self.mismatch is None


def load_hf(gguf: Path, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    """(model, tokenizer) from the GGUF file, read by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model.eval(), tokenizer


@torch.inference_mode()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits [T, V] (fp32) of one sequence, no cache."""
    return model(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(  # type: ignore[no-untyped-def]
    model, prompt: list[int], max_tokens: int, keep_logits: bool = False, stop_token: int | None = None
) -> Greedy:
    """Greedy decoding with transformers' KV cache; stops at ``stop_token`` only (None: ``ignore_eos``)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1].float()
    result = Greedy([], [])
    for _ in range(max_tokens):
        top = torch.topk(logits, 2)
        token = int(logits.argmax())  # argmax, as kvrelay and generate() break exact ties
        result.tokens.append(token)
        result.margins.append(float(top.values[0] - top.values[1]))
        if keep_logits:
            result.logits.append(logits)
        if len(result.tokens) == max_tokens or token == stop_token:
            break
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
    return result


def compare_greedy(reference: Greedy, got: list[int], near_tie: float) -> Verdict:
    """Token-exact per the project's note: equal, or first differing at a measured near-tie."""
    n = min(len(reference.tokens), len(got))
    for step in range(n):
        if reference.tokens[step] != got[step]:
            margin = reference.margins[step]
            if margin < near_tie:
                return Verdict(exact=False, near_tie_at=step)
            return Verdict(
                exact=False,
                mismatch=f"step {step}: reference {reference.tokens[step]}, got {got[step]}, "
                f"reference top-2 margin {margin:.4g} >= near-tie bound {near_tie:g}",
            )
    if len(got) != len(reference.tokens):
        return Verdict(exact=False, mismatch=f"{len(got)} tokens, reference has {len(reference.tokens)}")
    return Verdict(exact=True)


def chat_ids(tokenizer, question: str) -> list[int]:  # type: ignore[no-untyped-def]
    """transformers' own chat-template rendering and tokenization of one user message."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]
