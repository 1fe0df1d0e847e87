#!/usr/bin/env bash
# Debian's prometheus package (prometheus + promtool) for the metrics tests; idempotent.
set -euo pipefail
cd "$(dirname "$0")"
./apt-install.sh prometheus prometheus promtool
prometheus --version 2>&1 | head -n1
