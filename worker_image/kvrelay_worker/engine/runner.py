"""Model runner: turns a SchedulerOutput into tensors, runs the model on the paged cache, samples."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from kvrelay_worker.engine.paged_attention import (
    DecodeBatchBuilder,
    PagedAttention,
    build_paged_batch,
    layer_views,
)
from kvrelay_worker.engine.sampler import sample
from kvrelay_worker.engine.scheduler import ScheduledSeq, SchedulerOutput
from kvrelay_worker.model.llama import LlamaForCausalLM


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
        # the last all-greedy decode step's sampled tokens, as a list and as the argmax tensor
        self._last_tokens: list[int] | None = None
        self._last_ids: torch.Tensor | None = None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of every sequence whose ``sample`` flag is set."""
        seqs = out.seqs
        if not seqs:
            self.decode.reset()
            self._last_tokens = None
            return {}
        if all(len(s.token_ids) == 1 for s in seqs):
            return self._execute_decode(seqs)
        self.decode.reset()
        self._last_tokens = None
        input_ids, positions = [], []
        for s in seqs:
            input_ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + len(s.token_ids)))
        batch = build_paged_batch(
            [len(s.token_ids) for s in seqs],
            [s.start_pos for s in seqs],
            [s.block_ids for s in seqs],
            self.block_size,
            self.kv_cache.shape[3],
            self.device,
        )
        ids = self._tensor(input_ids)
        pos = self._tensor(positions)
        hidden = self.model(ids, pos, PagedAttention(self.kv_cache, batch, self.views))
        rows, sampled = [], []
        end = 0
        for s in seqs:
            end += len(s.token_ids)
            if s.sample:
                rows.append(end - 1)
                sampled.append(s)
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return self._sample(logits, sampled)

    def _execute_decode(self, seqs: list[ScheduledSeq]) -> dict[str, int]:
        """One token per sequence: the step metadata comes from the incremental decode builder."""
        batch, pos = self.decode.build([s.start_pos for s in seqs], [s.block_ids for s in seqs])
        input_ids = [s.token_ids[0] for s in seqs]
        if self.decode.same_batch and input_ids == self._last_tokens:
            ids = self._last_ids  # the tokens the last step sampled, still on the device
        else:
            ids = self._tensor(input_ids)
        self._last_tokens = None
        hidden = self.model(ids, pos, PagedAttention(self.kv_cache, batch, self.views))
        if not self.decode.same_batch:  # sampling params are per request: same tables, same requests
            self._all_greedy = all(s.params.greedy and not s.params.transforms_logits for s in seqs)
        if self._all_greedy and all(s.sample for s in seqs):  # one argmax, no per-row work
            self._last_ids = self.model.compute_logits(hidden).argmax(dim=-1)
            self._last_tokens = tokens = self._last_ids.tolist()
            return dict(zip([s.request_id for s in seqs], tokens, strict=True))
        rows = [i for i, s in enumerate(seqs) if s.sample]
        if not rows:
            return {}
        if len(rows) < len(seqs):
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self._sample(self.model.compute_logits(hidden), [seqs[i] for i in rows])

    def _sample(self, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> dict[str, int]:
        tokens = sample(
            logits,
            [s.params for s in seqs],
            [s.num_output_tokens for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            self.eos_token_ids,
        )
        return {s.request_id: t for s, t in zip(seqs, tokens, strict=True)}

    def _tensor(self, values: list[int]) -> torch.Tensor:
        t = torch.from_numpy(np.array(values, dtype=np.int64))
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)
