"""Model runner: turns a SchedulerOutput into tensors, runs the model on the paged cache, samples."""

from __future__ import annotations

import numpy as np
import torch

from kvrelay_worker.engine.paged_attention import PagedAttention, build_paged_batch
from kvrelay_worker.engine.sampler import sample
from kvrelay_worker.engine.scheduler import SchedulerOutput
from kvrelay_worker.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of every sequence whose ``sample`` flag is set."""
        seqs = out.seqs
        if not seqs:
            return {}
        decode_only = all(len(s.token_ids) == 1 for s in seqs)
        if decode_only:  # the common decode step: one token per sequence, no per-token loop
            input_ids = [s.token_ids[0] for s in seqs]
            positions = [s.start_pos for s in seqs]
        else:
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
        ids = torch.from_numpy(np.array(input_ids, dtype=np.int64)).to(self.device)
        pos = torch.from_numpy(np.array(positions, dtype=np.int64)).to(self.device)
        hidden = self.model(ids, pos, PagedAttention(self.kv_cache, batch))
        if decode_only and all(s.sample for s in seqs):
            logits = self.model.compute_logits(hidden)
            tokens = sample(logits, [s.params for s in seqs], [s.num_output_tokens for s in seqs])
            return {s.request_id: t for s, t in zip(seqs, tokens, strict=True)}
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
        tokens = sample(logits, [s.params for s in sampled], [s.num_output_tokens for s in sampled])
        return {s.request_id: t for s, t in zip(sampled, tokens, strict=True)}
