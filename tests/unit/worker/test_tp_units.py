"""Pure parts of tensor parallelism: where a pod's ranks go, what each rank loads, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kvrelay_worker.model.config import LlamaConfig
from kvrelay_worker.model.loader import load_model
from kvrelay_worker.model.parallel import TensorParallel, TensorParallelError, check_divides, shard_dim
from kvrelay_worker.model.tiny import make_tiny_model
from kvrelay_worker.tp.options import TPError, TPOptions, resolve


def test_a_pod_runs_its_share_of_the_ranks() -> None:
    p = resolve(TPOptions(size=16, nodes=2, node_rank=1, leader_addr="leader", port=29500), {})
    assert p.ranks_per_node == 8 and p.local_ranks == list(range(8, 16)) and p.local_index(9) == 1
    with pytest.raises(ValueError, match="does not divide"):
        TPOptions(size=6, nodes=4)
    with pytest.raises(TPError, match="outside"):
        resolve(TPOptions(size=4, nodes=2, node_rank=2), {})


@pytest.mark.parametrize(
    ("pod", "rank", "leader"),
    [("m-prefill-3", 0, "m-prefill-3.m-prefill.ns"), ("m-prefill-3-1", 1, "m-prefill-3.m-prefill.ns")],
)
def test_auto_placement_from_the_leaderworkerset_pod_name(pod: str, rank: int, leader: str) -> None:
    env = {"KVRELAY_LWS_NAME": "m-prefill", "POD_NAME": pod, "POD_NAMESPACE": "ns"}
    p = resolve(TPOptions(size=16, nodes=2, node_rank="auto", leader_addr="auto"), env)
    assert (p.node_rank, p.leader_addr) == (rank, leader)


def test_auto_placement_prefers_what_the_lws_webhook_injected() -> None:
    env = {
        "LWS_WORKER_INDEX": "1",
        "LWS_LEADER_ADDRESS": "lead.svc",
        "POD_NAME": "x",
        "KVRELAY_LWS_NAME": "y",
    }
    p = resolve(TPOptions(size=4, nodes=2, node_rank="auto", leader_addr="auto"), env)
    assert (p.node_rank, p.leader_addr) == (1, "lead.svc")
    with pytest.raises(TPError, match="POD_NAME"):
        resolve(
            TPOptions(size=4, nodes=2, node_rank="auto"), {"POD_NAME": "other-0", "KVRELAY_LWS_NAME": "m"}
        )


def _config(heads: int, kv_heads: int, inter: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32, hidden_size=heads * 8, intermediate_size=inter, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    )  # fmt: skip


def test_a_tp_degree_must_divide_heads_and_kv_heads() -> None:
    check_divides(_config(9, 3, 1536), 3)
    with pytest.raises(
        TensorParallelError, match="tensor parallel 2 does not divide the model's 9 attention heads"
    ):
        check_divides(_config(9, 3, 1536), 2)
    with pytest.raises(TensorParallelError, match="3 KV heads"):
        check_divides(_config(6, 3), 2)


def test_column_and_row_parallel_names() -> None:
    assert shard_dim("model.layers.0.self_attn.q_proj.weight") == 0
    assert shard_dim("model.layers.3.self_attn.v_proj.bias") == 0
    assert shard_dim("model.layers.0.mlp.up_proj.weight") == 0
    assert shard_dim("model.layers.0.self_attn.o_proj.weight") == 1
    assert shard_dim("model.layers.0.mlp.down_proj.weight") == 1
    assert shard_dim("model.layers.0.self_attn.o_proj.bias") is None  # added once, after the all-reduce
    for whole in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert shard_dim(whole) is None


def test_each_rank_loads_exactly_its_slice(tmp_path: Path) -> None:
    """The two ranks' shards, put back together, are the checkpoint: heads and MLP rows by rank."""
    model_dir = make_tiny_model(tmp_path / "m")
    whole = load_model(model_dir).state_dict()
    shards = [load_model(model_dir, tp=TensorParallel(rank=r, size=2)).state_dict() for r in range(2)]
    for name, tensor in whole.items():
        dim = shard_dim(name)
        if dim is None:
            assert all(torch.equal(s[name], tensor) for s in shards), name
        else:
            assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), tensor), name
    layer = load_model(model_dir, tp=TensorParallel(rank=1, size=2)).model.layers[0]
    assert (layer.self_attn.num_heads, layer.self_attn.num_kv_heads) == (2, 1)
