#!/usr/bin/env bash
# GPU check for the worker runtime, on a machine with one NVIDIA GPU (about 3 minutes; every step has
# a timeout, together under 8 minutes):
#   1. bench/gpu_check.py: a random ~1B Llama built here with transformers (no network, no checkpoint
#      to carry); kvrelay vs transformers logits in bf16/fp32, greedy agreement of the paged engine
#      (batch 16 and 1) with near-tie accounting, decode/prefill tokens/s, decode vs HBM roofline;
#   2. the engine correctness tests (engine == full recompute, KV handoff, refusals) on CUDA in bf16;
#   3. engine overhead and tokens/s vs a bare model forward, tiny and ~100M checkpoints;
#   4. with two or more GPUs: TP 2 over NCCL vs TP 1 (prefill and decode step time, logit noise).
# Each figure is one JSON line; paste the output into worker_image/README.md with the GPU's name.
# Exit status: 2 when no CUDA device is visible, 1 when a step failed or timed out, else 0.
#
#   bash bench/gpu_check.sh            # uses $VENV or ~/.cache/kvrelay/venv-py3.11, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS

VENV="${VENV:-$HOME/.cache/kvrelay/venv-py3.11}"
PY="${PYTHON:-$VENV/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"

die() { echo "gpu_check: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || die "nvidia-smi sees no GPU (or hung)"
timeout 60 "$PY" - <<'PY' || die "no CUDA device visible to torch ($PY); is CUDA_VISIBLE_DEVICES set?"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build {torch.version.cuda}): torch.cuda.is_available() is False")
print(f"torch {torch.__version__} cuda {torch.version.cuda} device {torch.cuda.get_device_name()}"
      f" bf16={torch.cuda.is_bf16_supported()}")
PY

FAILED=()
step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, record a failure, go on
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name (timeout ${limit}s)"
    timeout "$limit" "$@"
    rc=$?
    if ((rc == 124)); then
        echo "== $name: TIMED OUT after ${limit}s"
        FAILED+=("$name(timeout)")
    elif ((rc != 0)); then
        echo "== $name: FAILED rc=$rc"
        FAILED+=("$name(rc=$rc)")
    fi
}

step "kvrelay vs transformers, ~1B random Llama, CUDA bf16" 240 \
    "$PY" bench/gpu_check.py --device cuda --size 1b
KVRELAY_TEST_DEVICE=cuda KVRELAY_TEST_DTYPE=bfloat16 step "correctness on CUDA bf16" 90 \
    "$PY" -m pytest -q -p no:cacheprovider \
    tests/unit/worker/test_engine_correctness.py tests/unit/worker/test_engine_api.py \
    tests/unit/worker/test_block_pool.py tests/unit/worker/test_sampler.py
step "engine overhead, tiny model, CUDA bf16" 45 \
    "$PY" bench/engine_overhead.py --device cuda --dtype bfloat16 --batches 1 16 64 --steps 50
step "tokens/s vs bare model, tiny and ~100M, CUDA bf16" 60 \
    "$PY" bench/engine_throughput.py --device cuda --dtype bfloat16 --sizes tiny 100m
GPUS=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if ((GPUS >= 2)); then
    step "tensor parallel 2 over NCCL vs TP 1, ~1B random Llama, CUDA bf16" 120 \
        "$PY" bench/tensor_parallel.py --device cuda --size 1b --tp 2 --prompt 1024 --batch 32 --steps 30
else
    echo "== tensor parallel over NCCL: skipped, this machine has $GPUS GPU (TP 2 needs two)"
fi

echo "== done in $((SECONDS - START))s"
if ((${#FAILED[@]})); then
    echo "gpu_check: FAILED: ${FAILED[*]}" >&2
    exit 1
fi
echo "gpu_check: all steps passed"
