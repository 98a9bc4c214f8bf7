#!/usr/bin/env bash
# Copies the generated CRDs (crds/*.yaml at the repo root, rendered from api.py) into the chart.
# Never edit charts/kvrelay/crds/ by hand; tests/unit/charts/test_chart.py fails when it drifts.
set -euo pipefail
chart="$(cd "$(dirname "$0")" && pwd)"
src="$chart/../../crds"
mkdir -p "$chart/crds"
rm -f "$chart/crds/"*.yaml
cp "$src/"*.yaml "$chart/crds/"
ls "$chart/crds/"*.yaml
