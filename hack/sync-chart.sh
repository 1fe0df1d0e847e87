#!/usr/bin/env bash
# Refresh the chart's copies of generated files: crds/*.yaml (from hack/gen-crds.py) and the
# Grafana dashboard (from hack/gen-dashboard.py). tests/test_helm.py fails when they drift.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python; [[ -x $PY ]] || PY=python3

"$PY" hack/gen-dashboard.py
CHART=helm/finetune-operator
# Remove copies whose source is gone; kopf.dev_peerings.yaml lives only in the chart.
for copy in "$CHART"/crds/finetune.dev_*.yaml; do
  [[ -e $copy && ! -e crds/$(basename "$copy") ]] && rm -f "$copy"
done
cp crds/finetune.dev_*.yaml "$CHART/crds/"
cp dashboards/finetune-operator.json "$CHART/dashboards/finetune-operator.json"
