"""`finetune-trainer sync-adapters --config /etc/adapters/adapters.json`: put the adapters a vLLM
target's ConfigMap lists where the server reads them.

Runs beside vLLM (an init container, and a sidecar when FINETUNE_SYNC_INTERVAL > 0 seconds): for each
alias in adapters.json (alias -> {uri, digest, path}, written by the operator) it downloads the
adapter into a staging folder next to `path`, checks every file against the manifest with that
digest, and renames it into place, so the server never sees half an adapter or one whose files
changed in the bucket after governance judged them. An adapter already in place is left alone.
The kubelet refreshes a mounted ConfigMap by itself: the sidecar re-reads the file each round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import adapter, storage
from .errors import ConfigError
from .logs import get_logger

log = get_logger("sync-adapters")
_ALIAS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _entries(config_path: str) -> dict[str, dict]:
    try:
        raw = json.loads(Path(config_path).read_text(encoding="utf-8") or "{}")
    except ValueError as exc:
        raise ConfigError(f"{config_path}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: not an object of alias -> {{uri, digest, path}}")
    out = {}
    for alias, entry in raw.items():
        ok = (isinstance(entry, dict) and _ALIAS.match(str(alias)) and isinstance(entry.get("uri"), str)
              and re.fullmatch(r"sha256:[0-9a-f]{64}", str(entry.get("digest")))
              and isinstance(entry.get("path"), str) and entry["path"].startswith("/")
              and ".." not in entry["path"].split("/"))
        if not ok:
            raise ConfigError(f"{config_path}: entry {str(alias)[:64]!r} is not {{uri, digest, absolute path}}")
        out[alias] = entry
    return out


def in_place(path: Path, digest: str) -> bool:
    try:
        adapter.verify_folder(path, digest)
        return True
    except ValueError:
        return False


def sync_one(alias: str, entry: dict) -> bool:
    """True when the adapter is in place (already, or now)."""
    target = Path(entry["path"])
    if in_place(target, entry["digest"]):
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        folder = storage.download_folder(entry["uri"], staging)
        adapter.verify_folder(folder, entry["digest"])
        if folder != staging:  # a file:// adapter is used in place: copy it
            shutil.copytree(folder, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)  # a broken copy (not the digest it claims)
        os.replace(staging, target)
        log.info(f"{alias}: {entry['digest']} in place at {target}", extra={"event": "adapter_synced"})
        return True
    except (ValueError, ConfigError, FileNotFoundError) as exc:
        log.error(f"{alias}: {exc}", extra={"event": "adapter_refused"})
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run(config_path: str) -> int:
    interval = float(os.environ.get("FINETUNE_SYNC_INTERVAL", "0") or 0)
    while True:
        results = [sync_one(alias, entry) for alias, entry in sorted(_entries(config_path).items())]
        if interval <= 0:
            return 0 if all(results) else 1
        time.sleep(interval)
