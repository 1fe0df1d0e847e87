#!/usr/bin/env bash
# The main command: set up a fresh machine and run the quickstart end to end, with no cluster
# and no GPU: validate the dataset, fine-tune SmolLM2-135M-Instruct with LoRA, run the
# governance checks, promote the adapter, and show answers before and after.
#   hack/quickstart.sh           # the real model (a few minutes on 2 CPU cores)
#   hack/quickstart.sh --tiny    # a tiny model built from a config (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

hack/setup-venv.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# The pipeline runs one step at a time, so torch may use every core (the test suite, which runs
# servers beside the trainer, pins one thread instead).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec ftctl run examples/quickstart/ "$@"
