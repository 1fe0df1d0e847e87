#!/usr/bin/env bash
# apt-get install PACKAGE unless every COMMAND is on PATH already:  hack/apt-install.sh PACKAGE COMMAND...
# Idempotent; needs root or sudo (CI and the dev machines run as root). The package's own service
# is never started (policy-rc.d says 101): the tests start their own servers on free ports.
set -euo pipefail
package="$1"; shift

missing=0
for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
[[ $missing == 0 ]] && exit 0

SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "apt-install.sh: not root and no sudo; cannot apt-get install $package" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [[ ! -e "$POLICY" ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
  CREATED_POLICY=1
fi
trap '[[ $CREATED_POLICY == 1 ]] && $SUDO rm -f "$POLICY"' EXIT

# Package lists that do not know the package, or name files the mirror no longer has: update, retry.
install() { $SUDO apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; }
install || { $SUDO apt-get update -qq && install; }
for cmd in "$@"; do command -v "$cmd" >/dev/null; done
