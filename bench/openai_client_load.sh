#!/usr/bin/env bash
# Load run against `kvrelay serve --model smollm2` with a standard, third-party OpenAI-endpoint
# benchmark client (GuideLLM), so the figures do not come only from our own bench/serve_load.py.
#
#   bash bench/openai_client_load.sh [REPORT_DIR]      (default /tmp/kvrelay-openai-load)
#
# Load profile: synthetic prompts of 128 tokens (158 as the server counts them, chat template
# included), 64 output tokens forced (ignore_eos), streamed /v1/chat/completions, fixed
# concurrencies 1, 4 and 8, 60 s each (~4-5 minutes in all on the 2-core CPU machine).
# REPORT_DIR gets benchmarks.json (GuideLLM's full report), benchmarks.csv, console.txt
# (guidellm's console tables), serve.log and the worker logs.
#
# Environment (all optional):
#   KVRELAY_VENV     the project's venv with kvrelay's worker/router extras (default ~/.cache/kvrelay/venv-py3.11)
#   GUIDELLM_VERSION the client version (default 0.8.1: the one the README figures were taken with)
#   DURATION_S       seconds per concurrency level (default 60)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-/tmp/kvrelay-openai-load}" && cd "${1:-/tmp/kvrelay-openai-load}" && pwd)"
KVRELAY_VENV="${KVRELAY_VENV:-$HOME/.cache/kvrelay/venv-py3.11}"
GUIDELLM_VERSION="${GUIDELLM_VERSION:-0.8.1}"
DURATION_S="${DURATION_S:-60}"
# The client gets its own venv, keyed by tool and version: guidellm pins its own torch, transformers
# and httpx, which must not move the project's venv (and a version bump gets a fresh directory).
CLIENT_VENV="$HOME/.cache/kvrelay/bench-clients/guidellm-$GUIDELLM_VERSION"

# Run the kvrelay of this checkout, whatever checkout the venv's editable install points at.
export PYTHONPATH="$REPO/worker_image:$REPO/operator${PYTHONPATH:+:$PYTHONPATH}"
# No Hugging Face hub here: guidellm loads the tokenizer from the local model directory below.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if ! "$CLIENT_VENV/bin/guidellm" --version 2>/dev/null | grep -q "$GUIDELLM_VERSION"; then
    echo "== creating $CLIENT_VENV (guidellm==$GUIDELLM_VERSION from PyPI)"
    rm -rf "$CLIENT_VENV"
    python3.11 -m venv "$CLIENT_VENV"
    "$CLIENT_VENV/bin/pip" install --quiet --disable-pip-version-check "guidellm==$GUIDELLM_VERSION"
fi

# The same checkpoint directory `kvrelay serve --model smollm2` serves (imported on first use):
# guidellm needs its tokenizer.json / tokenizer_config.json to size the synthetic prompts.
MODEL_DIR="$("$KVRELAY_VENV/bin/python" -c \
    'from kvrelay_worker.model_store import resolve_model; print(resolve_model("smollm2"))' | tail -n 1)"
echo "== model directory: $MODEL_DIR"

# --port 0: the router binds a free port itself (no check-then-bind race) and prints its URL.
SERVE_LOG="$OUT/serve.log"
"$KVRELAY_VENV/bin/kvrelay" serve --model smollm2 --port 0 --log-dir "$OUT/worker-logs" >"$SERVE_LOG" 2>&1 &
SERVE_PID=$!
stop_server() {
    # SIGTERM makes `kvrelay serve` stop its workers in order (they also get SIGTERM if it dies).
    if kill -0 "$SERVE_PID" 2>/dev/null; then
        kill -TERM "$SERVE_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$SERVE_PID" 2>/dev/null || true
    fi
    wait "$SERVE_PID" 2>/dev/null || true
}
trap stop_server EXIT

# Ready = the router printed its URL and answers /v1/models (workers load in ~20-60 s here).
BASE=""
for _ in $(seq 1 300); do
    kill -0 "$SERVE_PID" 2>/dev/null || { echo "kvrelay serve exited:"; cat "$SERVE_LOG"; exit 1; }
    BASE="$(grep -o 'http://[^ ]*/v1' "$SERVE_LOG" | head -n 1 || true)"
    if [[ -n "$BASE" ]] && curl -fsS "$BASE/models" >/dev/null 2>&1; then break; fi
    BASE=""
    sleep 1
done
[[ -n "$BASE" ]] || { echo "kvrelay serve not ready after 300 s:"; cat "$SERVE_LOG"; exit 1; }
TARGET="${BASE%/v1}"
echo "== kvrelay serving at $BASE: $(curl -fsS "$BASE/models")"

# guidellm's openai_http backend streams with stream_options {include_usage, continuous_usage_stats}
# (the latter vLLM's extension, which the router implements: usage on every chunk) and ignore_eos.
BACKEND="{\"kind\":\"openai_http\",\"target\":\"$TARGET\",\"model\":\"smollm2\",\"request_format\":\"/v1/chat/completions\"}"

cd "$OUT"
echo "== guidellm $GUIDELLM_VERSION: concurrency 1, 4, 8; ${DURATION_S} s each"
"$CLIENT_VENV/bin/guidellm" run \
    --backend "$BACKEND" \
    --tokenizer "kind=huggingface_auto,model=$MODEL_DIR" \
    --data kind=synthetic_text,prompt_tokens=128,output_tokens=64 \
    --profile kind=concurrent --override profile.streams 1,4,8 \
    --constraint "kind=max_duration,seconds=$DURATION_S" \
    --output "kind=json,path=$OUT/benchmarks.json" \
    --output "kind=csv,path=$OUT/benchmarks.csv" \
    --disable-progress 2>&1 | tee "$OUT/console.txt"

echo "== report in $OUT"
