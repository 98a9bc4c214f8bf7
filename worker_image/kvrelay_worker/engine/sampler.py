"""Token sampling: logit transforms (bias, min_tokens, penalties), the grammar's mask, then greedy or
temperature, top-k, top-p, with a per-request seed."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from kvrelay_worker.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64 bits in which every input bit moves every output bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, index: int) -> int:
    """Generator seed for a seeded request's draw of output token ``index`` (63 bits).

    A pure function of (seed, index), so the draw at index k needs none of the earlier ones: a request
    resumed elsewhere at k (``SamplingParams.output_offset``) draws what the uninterrupted run would have.
    """
    return _mix64(_mix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    steps: Sequence[int],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    eos_token_ids: Collection[int] = (),
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> list[int]:
    """One token per row of ``logits`` [B, V] (fp32); ``steps`` are the rows' output-token counts so far.

    A row's logits go through, in this order: ``logit_bias``; the ``min_tokens`` ban (EOS unless
    ``ignore_eos``, and ``stop_token_ids``, at -inf); ``repetition_penalty``; ``presence_penalty`` and
    ``frequency_penalty``; the grammar's mask (``allowed``: a bool [V] per row, None for a free row);
    then greedy argmax, or temperature, top-k, top-p and the draw (see ``transform_logits``).
    ``prompts``/``outputs`` (each row's prompt and output token ids, so ``len(outputs[i]) == steps[i]``)
    are read only for rows with ``SamplingParams.transforms_logits``.

    A seeded request draws from a generator seeded with (seed, output index), so its tokens do not
    depend on which other requests share the batch, on preemption and recompute, or on a migration.
    """
    raw = logits
    rows = [i for i, p in enumerate(params) if p.transforms_logits]
    if rows:
        if prompts is None or outputs is None:
            raise ValueError("logit_bias, min_tokens and the penalties need the rows' prompts and outputs")
        if len(rows) == len(params):
            logits = transform_logits(logits, params, steps, prompts, outputs, eos_token_ids)
        else:
            at = torch.tensor(rows, device=logits.device)
            sub = transform_logits(
                logits[at],
                [params[i] for i in rows],
                [steps[i] for i in rows],
                [prompts[i] for i in rows],
                [outputs[i] for i in rows],
                eos_token_ids,
            )
            logits = logits.index_copy(0, at, sub)
    if allowed is not None and any(a is not None for a in allowed):
        logits = _mask(logits, raw, allowed)
    tokens = logits.argmax(dim=-1).tolist()
    if all(p.greedy for p in params):
        return tokens
    for row, (p, step) in enumerate(zip(params, steps, strict=True)):
        if p.greedy:
            continue
        probs = _filtered_probs(logits[row], p)
        gen = None
        if p.seed is not None:
            seed = draw_seed(p.seed, p.output_offset + step)
            gen = torch.Generator(device=logits.device).manual_seed(seed)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens


def transform_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    steps: Sequence[int],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_token_ids: Collection[int] = (),
) -> torch.Tensor:
    """``logits`` [R, V] after logit_bias, the min_tokens ban and the penalties, in that order (a copy).

    "Generated" tokens are a row's outputs plus the last ``output_offset`` prompt tokens (outputs of the
    run a resumed request continues): min_tokens counts them (``output_offset + steps[r]``) and the
    presence/frequency penalties count their occurrences, so a resumed request gets the logits the
    uninterrupted run would have. Repetition covers prompt and outputs, which a resume leaves unchanged.
    """
    num_rows, vocab = logits.shape
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    seen_rows: list[int] = []
    seen_ids: list[int] = []
    gen_rows: list[int] = []
    gen_ids: list[int] = []
    for r, p in enumerate(params):
        if p.logit_bias:
            ids = list(p.logit_bias)
            if max(ids) >= vocab:  # the engine refuses these at admission; never index past the row
                raise ValueError(f"logit_bias token id {max(ids)} outside the vocabulary [0, {vocab})")
            bias_rows += [r] * len(ids)
            bias_ids += ids
            bias_vals += p.logit_bias.values()
        if p.output_offset + steps[r] < p.min_tokens:
            banned = set(p.stop_token_ids) if p.ignore_eos else {*p.stop_token_ids, *eos_token_ids}
            # a stop id outside the vocabulary can never be sampled anyway
            banned = [t for t in banned if 0 <= t < vocab]
            ban_rows += [r] * len(banned)
            ban_ids += banned
        prompt, output = prompts[r], outputs[r]
        if p.repetition_penalty != 1.0:
            seen_rows += [r] * (len(prompt) + len(output))
            seen_ids += prompt
            seen_ids += output
        if p.presence_penalty or p.frequency_penalty:
            # max(): an offset past the prompt is refused by the engine; don't wrap around here
            earlier = prompt[max(len(prompt) - p.output_offset, 0) :] if p.output_offset else ()
            gen_rows += [r] * (len(earlier) + len(output))
            gen_ids += earlier
            gen_ids += output

    device, dtype = logits.device, logits.dtype
    out = logits.clone()
    if bias_rows:
        values = torch.tensor(bias_vals, dtype=dtype, device=device)
        out.index_put_((_index(bias_rows, device), _index(bias_ids, device)), values, accumulate=True)
    if ban_rows:
        minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
        out.index_put_((_index(ban_rows, device), _index(ban_ids, device)), minus_inf)
    # The penalties touch only the history's entries: gather, change, scatter back. A token seen twice
    # is gathered twice and written back twice with the same value, so duplicates need no dedup.
    if seen_rows:
        rows = _index(seen_rows, device)
        at = (rows, _index(seen_ids, device))
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=dtype, device=device)[rows]
        x = out[at]
        out[at] = torch.where(x > 0, x / penalty, x * penalty)
    if gen_rows:
        rows = _index(gen_rows, device)
        at = (rows, _index(gen_ids, device))
        counts = torch.zeros(num_rows, vocab, dtype=dtype, device=device)
        counts.index_put_(at, torch.tensor(1.0, dtype=dtype, device=device), accumulate=True)
        count = counts[at]
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=dtype, device=device)[rows]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=dtype, device=device)[rows]
        out[at] = out[at] - (freq * count + pres)  # every entry here occurs: count > 0
    return out


def _mask(logits: torch.Tensor, raw: torch.Tensor, allowed: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``logits`` with each constrained row's disallowed tokens at -inf (a copy).

    When the transforms left nothing the grammar allows (min_tokens bans EOS, the one token a finished
    grammar allows), the grammar wins: that row is masked from the raw logits instead.
    """
    out = logits.clone() if logits is raw else logits
    for r, mask in enumerate(allowed):
        if mask is None:
            continue
        row = out[r].masked_fill(~mask, float("-inf"))
        if not torch.isfinite(row).any():
            row = raw[r].masked_fill(~mask, float("-inf"))
        out[r] = row
    return out


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.long)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scaled = row / p.temperature
    if p.top_k > 0 and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    return torch.softmax(scaled, dim=-1)
