"""Megatron-style tensor parallelism: which slice of each weight a rank holds, and the all-reduce.

Column-parallel (output rows split by rank): q/k/v projections by head, gate/up by intermediate
row. Row-parallel (input columns split): o_proj and down_proj, whose partial outputs are summed
with one all-reduce each, then get their bias (held whole on every rank, added once).

Replicated: the embedding, the norms and the LM head. Every rank needs the whole hidden state at
the first layer, and only rank 0 computes logits (it samples); a vocabulary-sharded LM head would
add an all-gather of the logits every step to save one [vocab, hidden] matrix per rank, which for
the models served here (SmolLM2's 49,152 x 576, Llama-3-70B's 128,256 x 8,192 = 2 GiB in bf16) is
small next to the shard of the layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from kvrelay_worker.model.config import LlamaConfig


class TensorParallelError(ValueError):
    """The model cannot be split this many ways; the message names the numbers."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in its worker's TP group; ``group`` is a torch.distributed group."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place (a no-op at TP=1)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x


SINGLE = TensorParallel()


def check_divides(config: LlamaConfig, size: int) -> None:
    """Refuse a TP degree that does not divide the query heads, KV heads and MLP width."""
    problems = []
    for what, n in (
        ("attention heads", config.num_attention_heads),
        ("KV heads", config.num_key_value_heads),
        ("MLP intermediate size", config.intermediate_size),
    ):
        if n % size:
            problems.append(f"the model's {n} {what}")
    if problems:
        raise TensorParallelError(
            f"tensor parallel {size} does not divide {' and '.join(problems)}: choose a TP degree that "
            f"divides {config.num_attention_heads} attention heads and {config.num_key_value_heads} KV heads"
        )


# parameter-name suffix -> (dimension split across ranks, what the rows/columns count)
_COLUMN = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_ROW = re.compile(r"\.(o_proj|down_proj)\.weight$")


def shard_dim(name: str) -> int | None:
    """The dimension of parameter ``name`` split across ranks, or None if every rank holds it whole."""
    if _COLUMN.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def shard_range(full: int, tp: TensorParallel) -> tuple[int, int]:
    """[start, end) of this rank's equal share of ``full`` rows or columns."""
    part = full // tp.size
    return tp.rank * part, (tp.rank + 1) * part
