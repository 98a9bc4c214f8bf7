#!/usr/bin/env bash
# Installs Prometheus from the Debian/Ubuntu package if it is not on PATH, then prints its path.
# Idempotent: a second run installs nothing. Runs as root, or through sudo when not root.
# Used by the autoscaler's and the dashboards' end-to-end tests (a real Prometheus scrapes real
# workers); a Prometheus elsewhere on PATH (e.g. an upstream release tarball) is used as is.
set -euo pipefail

if binary="$(command -v prometheus)"; then
  echo "$binary"
  exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install-prometheus: not root and no sudo; install the 'prometheus' package by hand" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-prometheus: no apt-get; put a Prometheus binary on PATH (https://prometheus.io/download/)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq >&2
"${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >&2
# The package starts a system service on some hosts; tests run their own throwaway instances.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  "${as_root[@]}" systemctl disable --now prometheus >&2 || true
fi

binary="$(command -v prometheus)"
"$binary" --version 2>&1 | head -n 1 >&2
echo "$binary"
