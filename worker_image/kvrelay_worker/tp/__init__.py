"""Tensor parallelism across processes: placement, rank processes, rank 0's link, the ranked KV relay."""
