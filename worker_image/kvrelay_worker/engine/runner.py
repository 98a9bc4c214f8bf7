"""Model runner: turns a SchedulerOutput into tensors, runs the model on the paged cache, samples."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch

from kvrelay_worker.engine.grammar import allowed_tokens
from kvrelay_worker.engine.paged_attention import (
    DecodeBatchBuilder,
    PagedAttention,
    build_paged_batch,
    layer_views,
)
from kvrelay_worker.engine.request import TokenLogprobs
from kvrelay_worker.engine.sampler import sample
from kvrelay_worker.engine.scheduler import ScheduledSeq, SchedulerOutput, StepLogprobs
from kvrelay_worker.model.llama import LlamaForCausalLM

# prompt positions scored per logits slab: bounds the [rows, vocab] fp32 buffer a long prompt needs
PROMPT_LOGITS_ROWS = 256


@dataclass(frozen=True)
class StepInputs:
    """What a tensor-parallel rank needs to run one step's forward on its shard: rank 0 sends it
    before its own forward, the other ranks replay it (``ModelRunner.replay``)."""

    token_ids: list[list[int]]  # per sequence, the tokens computed this step
    start_pos: list[int]
    block_ids: list[list[int]]
    decode: bool  # one token per sequence: built by the incremental decode builder


# Called by rank 0 with each step's inputs (None: a step without sequences) before its forward.
StepSink = Callable[[StepInputs | None], None]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        eos_token_ids: Collection[int] = (),
    ) -> None:
        self.model = model
        self.eos_token_ids = eos_token_ids  # what min_tokens bans (with the request's stop ids)
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.views = layer_views(kv_cache)
        self.decode = DecodeBatchBuilder(block_size, kv_cache.shape[3], self.device)
        self._all_greedy = False  # of the decode builder's cached batch
        self._wants_logprobs = False  # of the same batch: some request asked for logprobs
        # the last all-greedy decode step's sampled tokens, as a list and as the argmax tensor
        self._last_tokens: list[int] | None = None
        self._last_ids: torch.Tensor | None = None
        self.step_sink: StepSink | None = None  # set on rank 0 of a TP group

    @torch.inference_mode()
    def replay(self, step: StepInputs | None) -> None:
        """A non-zero TP rank: run the forward rank 0 runs for ``step`` (this rank's heads; no sampling)."""
        if step is None:
            self.decode.reset()
        elif step.decode:
            batch, pos = self.decode.build(step.start_pos, step.block_ids)
            ids = self._tensor([t[0] for t in step.token_ids])
            self.model(ids, pos, PagedAttention(self.kv_cache, batch, self.views))
        else:
            self._prefill_forward(step.token_ids, step.start_pos, step.block_ids)

    def _prefill_forward(
        self, token_ids: list[list[int]], start_pos: list[int], block_ids: list[list[int]]
    ) -> torch.Tensor:
        self.decode.reset()
        input_ids, positions = [], []
        for tokens, start in zip(token_ids, start_pos, strict=True):
            input_ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
        batch = build_paged_batch(
            [len(t) for t in token_ids],
            start_pos,
            block_ids,
            self.block_size,
            self.kv_cache.shape[3],
            self.device,
        )
        return self.model(
            self._tensor(input_ids), self._tensor(positions), PagedAttention(self.kv_cache, batch, self.views)
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[dict[str, int], StepLogprobs | None]:
        """Run one step: the sampled token of every sequence whose ``sample`` flag is set, and the
        logprobs of the requests that asked (None when none in the step did)."""
        seqs = out.seqs
        if not seqs:
            if self.step_sink is not None:
                self.step_sink(None)
            self.decode.reset()
            self._last_tokens = None
            return {}, None
        if all(len(s.token_ids) == 1 for s in seqs):
            return self._execute_decode(seqs)
        self._last_tokens = None
        token_ids = [s.token_ids for s in seqs]
        start_pos = [s.start_pos for s in seqs]
        block_ids = [s.block_ids for s in seqs]
        if self.step_sink is not None:
            self.step_sink(StepInputs(token_ids, start_pos, block_ids, decode=False))
        hidden = self._prefill_forward(token_ids, start_pos, block_ids)
        rows, sampled = [], []
        end = 0
        for s in seqs:
            end += len(s.token_ids)
            if s.sample:
                rows.append(end - 1)
                sampled.append(s)
        logprobs = self._prompt_logprobs(hidden, seqs) if any(s.params.wants_logprobs for s in seqs) else None
        if not rows:
            return {}, logprobs
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return self._sample(logits, sampled, logprobs)

    def _execute_decode(self, seqs: list[ScheduledSeq]) -> tuple[dict[str, int], StepLogprobs | None]:
        """One token per sequence: the step metadata comes from the incremental decode builder."""
        start_pos, block_ids = [s.start_pos for s in seqs], [s.block_ids for s in seqs]
        input_ids = [s.token_ids[0] for s in seqs]
        if self.step_sink is not None:
            self.step_sink(StepInputs([[t] for t in input_ids], start_pos, block_ids, decode=True))
        batch, pos = self.decode.build(start_pos, block_ids)
        if self.decode.same_batch and input_ids == self._last_tokens:
            ids = self._last_ids  # the tokens the last step sampled, still on the device
        else:
            ids = self._tensor(input_ids)
        self._last_tokens = None
        hidden = self.model(ids, pos, PagedAttention(self.kv_cache, batch, self.views))
        if not self.decode.same_batch:  # sampling params are per request: same tables, same requests
            self._wants_logprobs = any(s.params.wants_logprobs for s in seqs)
            self._all_greedy = not self._wants_logprobs and all(
                s.params.greedy and not s.params.transforms_logits and s.matcher is None for s in seqs
            )
        if self._all_greedy and all(s.sample for s in seqs):  # one argmax, no per-row work
            self._last_ids = self.model.compute_logits(hidden).argmax(dim=-1)
            self._last_tokens = tokens = self._last_ids.tolist()
            return dict(zip([s.request_id for s in seqs], tokens, strict=True)), None
        # a one-token step may still be a prompt chunk (the budget's last token): score it if asked
        logprobs = self._prompt_logprobs(hidden, seqs) if self._wants_logprobs else None
        rows = [i for i, s in enumerate(seqs) if s.sample]
        if not rows:
            return {}, logprobs
        if len(rows) < len(seqs):
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self._sample(self.model.compute_logits(hidden), [seqs[i] for i in rows], logprobs)

    def _sample(
        self, logits: torch.Tensor, seqs: list[ScheduledSeq], logprobs: StepLogprobs | None
    ) -> tuple[dict[str, int], StepLogprobs | None]:
        """Draw one token per row of ``logits``; score the drawn tokens of the rows that asked."""
        vocab = logits.shape[-1]
        allowed = [None if s.matcher is None else allowed_tokens(s.matcher, vocab, self.device) for s in seqs]
        tokens = sample(
            logits,
            [s.params for s in seqs],
            [s.num_output_tokens for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            self.eos_token_ids,
            allowed,
        )
        if logprobs is not None:
            asked = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
            if asked:
                # ``logits`` is still the raw one (the sampler transforms copies): the model's distribution
                at = torch.tensor(asked, device=self.device)
                scored = _score(
                    logits[at],
                    [tokens[i] for i in asked],
                    [seqs[i].params.logprobs or 0 for i in asked],
                )
                logprobs.sampled.update(zip([seqs[i].request_id for i in asked], scored, strict=True))
        return {s.request_id: t for s, t in zip(seqs, tokens, strict=True)}, logprobs

    def _prompt_logprobs(self, hidden: torch.Tensor, seqs: list[ScheduledSeq]) -> StepLogprobs:
        """Score the prompt positions this step computed for the requests with ``prompt_logprobs``.

        Position ``q`` predicts prompt token ``q + 1``, so positions up to ``len(prompt) - 2`` count; those
        a request already has (computed before a preemption) are skipped.
        """
        logprobs = StepLogprobs()
        start_row = 0
        for s in seqs:
            n = len(s.token_ids)
            k = s.params.prompt_logprobs
            if k is not None:
                lo = max(s.start_pos, len(s.prompt_logprobs))
                hi = min(s.start_pos + n, len(s.prompt_token_ids) - 1)
                if lo < hi:
                    rows = start_row + lo - s.start_pos
                    scored: list[TokenLogprobs] = []
                    # slab by slab: a long prompt never holds [positions, vocab] fp32 logits at once
                    for a in range(lo, hi, PROMPT_LOGITS_ROWS):
                        b = min(a + PROMPT_LOGITS_ROWS, hi)
                        logits = self.model.compute_logits(hidden[rows + a - lo : rows + b - lo])
                        scored += _score(logits, s.prompt_token_ids[a + 1 : b + 1], [k] * (b - a))
                    logprobs.prompt[s.request_id] = scored
            start_row += n
        return logprobs

    def _tensor(self, values: list[int]) -> torch.Tensor:
        t = torch.from_numpy(np.array(values, dtype=np.int64))
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)


def _score(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprobs]:
    """Row i: log_softmax (fp32) of ``logits[i]``, the logprob of ``token_ids[i]`` and its top ``ks[i]``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, ids).squeeze(1).tolist()
    k_max = max(ks)
    top_ids: list[list[int]] = [[] for _ in ks]
    top_vals: list[list[float]] = [[] for _ in ks]
    if k_max:
        top = torch.topk(logprobs, k_max, dim=-1)
        top_ids, top_vals = top.indices.tolist(), top.values.tolist()
    return [
        TokenLogprobs(t, lp, tuple(i[:k]), tuple(v[:k]))
        for t, lp, i, v, k in zip(token_ids, chosen, top_ids, top_vals, ks, strict=True)
    ]
