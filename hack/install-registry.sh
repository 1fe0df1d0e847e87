#!/usr/bin/env bash
# Debian's docker-registry (the CNCF distribution registry, v2.8) for the OCI serving-target tests
# (tests/registry.py starts one on a free port); idempotent.
set -euo pipefail
cd "$(dirname "$0")"
./apt-install.sh docker-registry docker-registry
docker-registry --version 2>&1 | head -n1
