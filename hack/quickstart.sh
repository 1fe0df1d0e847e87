#!/usr/bin/env bash
# The main command: set up a fresh machine and run the quickstart end to end, with no cluster
# and no GPU: validate the dataset, fine-tune SmolLM2-135M-Instruct with LoRA, run the
# governance checks, promote the adapter, and show answers before and after.
#   hack/quickstart.sh           # the real model (under 3 minutes on 2 CPU cores)
#   hack/quickstart.sh --tiny    # a tiny model built from a config (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

hack/setup-venv.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# Torch threads: ftctl picks as many as there are idle CPUs when it starts (one per busy core
# less: a second thread beside a CPU-bound neighbour made training 5x slower) and says so; an
# OMP_NUM_THREADS you set wins. It prints a time-per-phase table at the end.
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec ftctl run examples/quickstart/ "$@"
