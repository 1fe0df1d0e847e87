#!/usr/bin/env bash
# Installs Debian's prometheus package (prometheus + promtool) when either is missing.
# Idempotent; needs root (CI and the dev machines run as root). The package's own service is
# not started: tests start their own registry on a free port
# (tests/registry.py) for the OCI serving target.
set -euo pipefail

if command -v docker-registry >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install-registry.sh: not root and no sudo; cannot apt-get install docker-registry" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 keeps the package's postinst from starting a system-wide registry.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [[ ! -e "$POLICY" ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
  CREATED_POLICY=1
fi
trap '[[ $CREATED_POLICY == 1 ]] && $SUDO rm -f "$POLICY"' EXIT

# apt-get update only when the package lists do not know the package yet (a fresh machine).
apt-cache show docker-registry >/dev/null 2>&1 || $SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
command -v docker-registry >/dev/null
docker-registry --version 2>&1 | head -n1
