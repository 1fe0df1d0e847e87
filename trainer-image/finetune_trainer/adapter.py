"""The trained adapter as a content-addressed, never-overwritten folder, and its verification.

    {outputURI}/adapters/<digest-hex>/adapter_model.safetensors
                                     /adapter_config.json     (PeftModel.from_pretrained loads the folder)
                                     /manifest.json           (uploaded LAST; its sha256 is the digest)
    {outputURI}/result.json          (what the operator reads: adapterURI, digest, sizeBytes, metrics)

Files are first staged under adapters/.staging-<runid>/, then copied into the digest folder
with manifest.json last and read back. A folder whose manifest is missing or does not match
its files is not an adapter; `verify` is what governance and promotion call to check that.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

from . import __version__, storage
from .errors import ConfigError, TransientError
from .logs import get_logger

log = get_logger("adapter")

MANIFEST = "manifest.json"
RESULT = "result.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def adapters_uri(output_uri: str) -> str:
    return storage.join(output_uri, "adapters")


def build_manifest(folder: Path, *, base_model: dict, dataset: dict, training: dict, metrics: dict,
                   lineage: Optional[dict] = None, replay: Optional[list] = None) -> bytes:
    """manifest.json bytes: deterministic (sorted keys, no timestamps), so the same run gives the same digest.
    `lineage` (spec.initFrom: parent and chain) and `replay` (the replayed data) only when set."""
    files = {name: {"sha256": storage.sha256_file(folder / name), "size": (folder / name).stat().st_size}
             for name in ADAPTER_FILES}
    manifest = {
        "files": files,
        "baseModel": base_model,
        "dataset": dataset,
        "training": training,
        "metrics": metrics,
        "trainerVersion": __version__,
    }
    if lineage is not None:
        manifest["lineage"] = lineage
    if replay:
        manifest["replay"] = replay
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def save_peft_files(model, folder: Path, base_model_uri: str, state_dict: Optional[dict] = None) -> None:
    """Only the two files PeftModel.from_pretrained needs (peft's README model card is dropped).
    `state_dict`: the adapter's whole weights when the model's are sharded (FSDP)."""
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model_uri  # the URI, not this pod's cache path
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(str(folder), save_embedding_layers=False, **extra)  # embeddings are frozen: nothing to save
    for extra in folder.iterdir():
        if extra.name not in ADAPTER_FILES:
            extra.unlink()
    # peft writes target_modules from a set (order varies with the hash seed); a reproducible
    # digest needs reproducible bytes.
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def publish(folder: Path, manifest: bytes, output_uri: str, run_id: str, metrics: dict,
            balance: Optional[dict] = None) -> dict[str, Any]:
    """Stage, then copy into adapters/<digest-hex>/ (manifest last, read back), then write result.json
    (with the group counts of training.balance, when it ran, for the job's status)."""
    hexdigest = hashlib.sha256(manifest).hexdigest()
    digest = "sha256:" + hexdigest
    staging = storage.join(adapters_uri(output_uri), f".staging-{run_id}")
    final = storage.join(adapters_uri(output_uri), hexdigest)
    for name in ADAPTER_FILES:
        storage.upload_file(folder / name, storage.join(staging, name))
    storage.write_bytes(storage.join(staging, MANIFEST), manifest)

    ok, why = verify(final)
    if ok:
        log.info("adapter already published", extra={"event": "adapter_exists", "digest": digest})
    else:
        if storage.exists(storage.join(final, MANIFEST)):
            # A complete-looking folder that fails verification is someone else's broken write: never overwrite.
            raise ConfigError(f"{final}: exists but does not verify ({why}); refusing to overwrite")
        for name in ADAPTER_FILES:
            storage.copy(storage.join(staging, name), storage.join(final, name))
        storage.write_bytes(storage.join(final, MANIFEST), manifest)
        if storage.read_bytes(storage.join(final, MANIFEST)) != manifest:
            raise TransientError(f"{final}/{MANIFEST}: read-back differs from what was written")
    # Our staging folder, and any left by an attempt that was killed mid-upload (one trainer per output).
    for leftover in {n.split("/", 1)[0] for n in storage.list_keys(adapters_uri(output_uri))
                     if n.startswith(".staging-")}:
        storage.delete_prefix(storage.join(adapters_uri(output_uri), leftover))
    size = sum(json.loads(manifest)["files"][n]["size"] for n in ADAPTER_FILES) + len(manifest)
    result = {"adapterURI": final, "digest": digest, "sizeBytes": size, "metrics": metrics}
    if balance:
        result["balance"] = balance
    storage.write_text(storage.join(output_uri, RESULT), json.dumps(result, indent=1, sort_keys=True))
    log.info("adapter published", extra={"event": "adapter_published", "digest": digest, "uri": final})
    return result


#: A manifest is a few KiB (file hashes, the job's config, metrics); a store serving more is hostile.
MANIFEST_MAX_BYTES = 4 << 20


def _plain_name(fname: Any) -> bool:
    """A manifest entry names a file inside the adapter folder: relative, no `..`, no empty parts."""
    return isinstance(fname, str) and bool(fname) and not fname.startswith("/") and \
        all(part not in ("", ".", "..") for part in fname.split("/"))


def verify(adapter_uri: str) -> tuple[bool, str]:
    """Check every file of an adapter folder against its manifest (and the folder name, when it
    is a digest). Returns (ok, message); never raises for a missing or broken adapter.

    Files are hashed while they stream in (storage.iter_chunks, CHUNK_SIZE at a time): nothing is
    written to disk and memory stays at about one chunk whatever the adapter's size. The store is
    not trusted: a file is never read past its manifest size + one chunk (a bucket may serve an
    endless object), and the manifest itself past MANIFEST_MAX_BYTES."""
    try:
        manifest_bytes = storage.read_bytes_limited(storage.join(adapter_uri, MANIFEST), MANIFEST_MAX_BYTES)
    except FileNotFoundError:
        return False, f"{adapter_uri}: no {MANIFEST} (not a complete adapter)"
    except ValueError:
        return False, f"{adapter_uri}/{MANIFEST}: larger than {MANIFEST_MAX_BYTES} bytes (not a valid manifest)"
    hexdigest = hashlib.sha256(manifest_bytes).hexdigest()
    name = storage.parse(adapter_uri).key.rstrip("/").rsplit("/", 1)[-1]
    if _HEX.match(name) and name != hexdigest:
        return False, f"{adapter_uri}: {MANIFEST} digest sha256:{hexdigest} does not match the folder name"
    try:
        files = json.loads(manifest_bytes)["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
            raise TypeError("files")
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: "[[[[..." nested past Python's limit
        return False, f"{adapter_uri}/{MANIFEST}: not a valid manifest"
    for fname, meta in sorted(files.items()):
        if not _plain_name(fname):
            return False, f"{adapter_uri}/{MANIFEST}: file name {fname[:200]!r} is not a plain relative path"
        size = meta.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return False, f"{adapter_uri}/{MANIFEST}: {fname}: size {repr(size)[:100]} is not a byte count"
        chunks = storage.iter_chunks(storage.join(adapter_uri, fname))
        try:
            sha, read = storage.sha256_stream(chunks, limit=size)
        except FileNotFoundError:
            return False, f"{adapter_uri}/{fname}: listed in the manifest but missing"
        finally:
            chunks.close()  # stopped early (a longer file): drop the connection, never drain it
        if read > size:
            return False, f"{adapter_uri}/{fname}: size > {size} != manifest {size} (stopped reading at {read} bytes)"
        if read != size:
            return False, f"{adapter_uri}/{fname}: size {read} != manifest {size}"
        if sha != meta.get("sha256"):
            return False, f"{adapter_uri}/{fname}: sha256 does not match the manifest"
    return True, f"{adapter_uri}: {len(files)} files match manifest sha256:{hexdigest}"


def verify_folder(folder: Path, digest: str) -> list[Path]:
    """Check a downloaded adapter folder: its manifest has `digest` and every file it lists matches.
    Returns the files (manifest first); raises ValueError naming what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file() or manifest_path.stat().st_size > MANIFEST_MAX_BYTES:
        raise ValueError(f"{folder}: no {MANIFEST} (or one larger than {MANIFEST_MAX_BYTES} bytes)")
    raw = manifest_path.read_bytes()
    if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
        raise ValueError(f"{folder}/{MANIFEST} does not have the digest {digest}")
    try:
        files = json.loads(raw)["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
            raise TypeError("files")
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{folder}/{MANIFEST}: not a valid manifest") from None
    paths = [manifest_path]
    for fname, meta in sorted(files.items()):
        path = folder / fname
        if not _plain_name(fname) or not path.is_file() or path.is_symlink():
            raise ValueError(f"{folder}: {str(fname)[:200]!r} listed in the manifest is missing or not a plain file")
        if storage.sha256_file(path) != meta.get("sha256"):
            raise ValueError(f"{folder}/{fname}: sha256 does not match the manifest")
        paths.append(path)
    return paths


def list_adapters(output_uri: str) -> list[str]:
    """URIs of the complete (verified) adapters under {output_uri}/adapters/ -- never a staging folder."""
    folders = {n.split("/", 1)[0] for n in storage.list_keys(adapters_uri(output_uri)) if "/" in n}
    return [uri for uri in (storage.join(adapters_uri(output_uri), f) for f in sorted(folders) if _HEX.match(f))
            if verify(uri)[0]]
