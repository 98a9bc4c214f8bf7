#!/usr/bin/env bash
# GPU check for the worker runtime, on a machine with one NVIDIA GPU (< 8 minutes):
#   1. the engine correctness tests (engine == full recompute, KV handoff, refusals) on CUDA in bf16;
#   2. engine overhead and tokens/s on the tiny model and a ~1B-parameter random Llama-shaped checkpoint.
# Each figure is one JSON line; paste the output into worker_image/README.md with the GPU's name.
#
#   bash bench/gpu_check.sh            # uses $VENV or ~/.cache/kvrelay/venv-py3.11, else python3
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-$HOME/.cache/kvrelay/venv-py3.11}"
PY="${PYTHON:-$VENV/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__} cuda {torch.version.cuda} device {torch.cuda.get_device_name()}"
      f" bf16={torch.cuda.is_bf16_supported()}")
PY

echo "== correctness on CUDA bf16 (tests/unit/worker engine tests)"
KVRELAY_TEST_DEVICE=cuda KVRELAY_TEST_DTYPE=bfloat16 timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
    tests/unit/worker/test_engine_correctness.py tests/unit/worker/test_engine_api.py \
    tests/unit/worker/test_block_pool.py tests/unit/worker/test_sampler.py || echo "CORRECTNESS FAILED rc=$?"

echo "== engine overhead, tiny model, CUDA bf16"
timeout 120 "$PY" bench/engine_overhead.py --device cuda --dtype bfloat16 --batches 1 16 64 --steps 50

echo "== tokens/s, tiny and ~1B random checkpoint, CUDA bf16"
timeout 240 "$PY" bench/engine_throughput.py --device cuda --dtype bfloat16 --sizes tiny 1b
