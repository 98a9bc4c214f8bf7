"""Performance model of one prefill / decode replica: timings from first principles plus sources.

Default: Llama-3.1-70B-Instruct in bf16 on H100-SXM-80GB, tensor parallel 4 for both roles.

Sources of the constants (all public):
- Model shape: Llama 3.1 model card / config.json (meta-llama/Llama-3.1-70B): 70.6e9 parameters,
  80 layers, hidden 8192, 64 query heads, 8 KV heads, head dim 128.
- H100 SXM5 datasheet (NVIDIA, 2023): 989 TFLOPS dense BF16, 3.35 TB/s HBM3, 80 GB.
- ConnectX-7 / NDR InfiniBand: 400 Gb/s per port, one port per GPU in DGX H100 (NVIDIA DGX H100
  user guide).
- Assumptions (stated, not measured here): prefill reaches 45% MFU at TP=4 (DistServe, OSDI'24,
  and Sarathi-Serve, OSDI'24, report 40-60% for large prefills); decode reaches 70% of HBM
  bandwidth; 3 ms fixed per decode step (kernel launches, TP all-reduce, sampling) and 20 us per
  sequence; a new replica takes 60 s from allocation to serving (pod start, 141 GB of weights
  from local NVMe at ~4 GB/s, CUDA graph capture; ServerlessLLM, OSDI'24, measures tens of
  seconds to minutes for checkpoints of this size); 90% of HBM usable, 3 GB per GPU for
  activations. KV transfer at 80% of link rate plus 2 ms setup.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelShape(BaseModel):
    """Transformer shape numbers that drive compute and memory."""

    model_config = ConfigDict(frozen=True)

    name: str = "Llama-3.1-70B"
    num_params: float = 70.6e9
    num_layers: int = 80
    hidden_size: int = 8192
    num_kv_heads: int = 8
    head_dim: int = 128
    bytes_per_param: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, all KV heads (before tensor-parallel split)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param


class GpuSpec(BaseModel):
    """One accelerator."""

    model_config = ConfigDict(frozen=True)

    name: str = "H100-SXM-80GB"
    bf16_flops: float = 989e12
    hbm_bytes_per_second: float = 3.35e12
    memory_bytes: float = 80e9
    nic_bytes_per_second: float = 50e9  # 400 Gb/s NDR per GPU


class ReplicaModel(BaseModel):
    """Timing of one replica of either role (both roles use the same TP here)."""

    model_config = ConfigDict(frozen=True)

    model: ModelShape = ModelShape()
    gpu: GpuSpec = GpuSpec()
    tensor_parallel: int = Field(4, ge=1)
    prefill_mfu: float = 0.45
    prefill_batch_overhead_seconds: float = 0.005
    max_prefill_batch_tokens: int = 4096
    decode_bandwidth_efficiency: float = 0.70
    decode_step_overhead_seconds: float = 0.003
    decode_per_sequence_seconds: float = 20e-6
    max_decode_batch: int = 256
    usable_memory_fraction: float = 0.90
    activation_bytes_per_gpu: float = 3e9
    kv_link_efficiency: float = 0.80
    kv_setup_seconds: float = 0.002
    cold_start_seconds: float = 60.0

    def prefill_seconds(self, num_tokens: int) -> float:
        """Compute-bound prefill of one prompt: linear GEMMs plus causal attention (n^2)."""
        flops = (
            2 * self.model.num_params * num_tokens
            + 2 * self.model.num_layers * self.model.hidden_size * (num_tokens**2)
        )
        return flops / (self.gpu.bf16_flops * self.prefill_mfu * self.tensor_parallel)

    def decode_step_seconds(self, batch: int, context_tokens: int) -> float:
        """Memory-bound decode step: every rank reads its weight shard and its KV shard."""
        if batch == 0:
            return 0.0
        bandwidth = self.gpu.hbm_bytes_per_second * self.decode_bandwidth_efficiency
        weights = self.model.num_params * self.model.bytes_per_param / self.tensor_parallel
        kv = context_tokens * self.model.kv_bytes_per_token / self.tensor_parallel
        return (
            (weights + kv) / bandwidth
            + self.decode_step_overhead_seconds
            + batch * self.decode_per_sequence_seconds
        )

    def kv_transfer_seconds(self, num_tokens: int) -> float:
        """Prefill -> decode KV relay: every TP rank sends its shard over its own NIC."""
        link = self.gpu.nic_bytes_per_second * self.kv_link_efficiency * self.tensor_parallel
        return self.kv_setup_seconds + num_tokens * self.model.kv_bytes_per_token / link

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache one decode replica holds."""
        per_gpu = (
            self.gpu.memory_bytes * self.usable_memory_fraction
            - self.model.num_params * self.model.bytes_per_param / self.tensor_parallel
            - self.activation_bytes_per_gpu
        )
        return int(per_gpu * self.tensor_parallel / self.model.kv_bytes_per_token)

    def prefill_tokens_per_second(self, prompt_tokens: int) -> float:
        """Steady prefill throughput for prompts of one length (a profile point)."""
        return prompt_tokens / self.prefill_seconds(prompt_tokens)

    def decode_batch_at_itl(self, itl_seconds: float, mean_context: int) -> int:
        """Largest batch whose step time stays within `itl_seconds` at a mean context."""
        best = 0
        for batch in range(1, self.max_decode_batch + 1):
            fits_memory = batch * mean_context <= self.kv_capacity_tokens
            if not fits_memory or self.decode_step_seconds(batch, batch * mean_context) > itl_seconds:
                break
            best = batch
        return best

    def decode_tokens_per_second_at_itl(self, itl_seconds: float, mean_context: int) -> float:
        """Profile point: decode throughput of one replica at the ITL SLO (0 if unreachable)."""
        batch = self.decode_batch_at_itl(itl_seconds, mean_context)
        if batch == 0:
            return 0.0
        return batch / self.decode_step_seconds(batch, batch * mean_context)
