"""Resumable checkpoints under {outputURI}/checkpoints/step-{step:08d}/.

A checkpoint holds the adapter weights, optimizer, scheduler, RNG states and the data
position. `checkpoint.json` (every file with its sha256) is uploaded LAST: a folder
without it, or whose files do not match it, is an interrupted write and is ignored.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import storage
from .logs import get_logger

log = get_logger("checkpoint")

MARKER = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Where the run is: enough to continue as if it had never stopped."""

    step: int = 0
    epoch: int = 0  # current epoch (0-based)
    batch_index: int = 0  # next micro-batch of that epoch
    tokens_seen: int = 0  # real (non-padding) tokens trained on
    last_loss: Optional[float] = None
    last_eval_loss: Optional[float] = None
    #: Hash of everything that shapes the math (model, data, method, schedule): a checkpoint is only
    #: resumed by the run that wrote it, never by a changed spec pointed at the same output.
    fingerprint: str = ""


def checkpoints_uri(output_uri: str) -> str:
    return storage.join(output_uri, "checkpoints")


def step_uri(output_uri: str, step: int) -> str:
    return storage.join(checkpoints_uri(output_uri), f"step-{step:08d}")


def rng_state() -> dict:
    """Every generator's state in types `torch.load(weights_only=True)` reads (tensors, tuples,
    numbers, strings): numpy's key array travels as a tensor, so no pickle is ever needed."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_uri: str, state: TrainState, *, adapter_state: dict, optimizer, scheduler,
         extra: Optional[dict] = None) -> str:
    """Write one checkpoint (marker last) and return its URI."""
    from safetensors.torch import save_file

    dest = step_uri(output_uri, state.step)
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        tmp_path = Path(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()},
                  str(tmp_path / "adapter.safetensors"))
        # An optimizer, or its state already made whole (FSDP: distributed.optimizer_state)
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp_path / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
        torch.save(rng_state(), tmp_path / "rng.pt")
        (tmp_path / "state.json").write_text(json.dumps({**asdict(state), **(extra or {})}, indent=1))
        files = {}
        for path in sorted(tmp_path.iterdir()):
            storage.upload_file(path, storage.join(dest, path.name))
            files[path.name] = {"sha256": storage.sha256_file(path), "size": path.stat().st_size}
        marker = {"step": state.step, "files": files}
        storage.write_text(storage.join(dest, MARKER), json.dumps(marker, indent=1, sort_keys=True))
    log.info("checkpoint written", extra={"event": "checkpoint", "step": state.step, "uri": dest})
    return dest


def list_steps(output_uri: str) -> list[int]:
    """Steps of checkpoint folders that have a marker, newest first (not yet verified)."""
    steps = set()
    for name in storage.list_keys(checkpoints_uri(output_uri)):
        folder, _, leaf = name.partition("/")
        m = _STEP_DIR.match(folder)
        if m and leaf == MARKER:
            steps.add(int(m.group(1)))
    return sorted(steps, reverse=True)


def _download_verified(uri: str, dest: Path) -> bool:
    try:
        marker = json.loads(storage.read_text(storage.join(uri, MARKER)))
        for name, meta in marker["files"].items():
            target = dest / name
            target.write_bytes(storage.read_bytes(storage.join(uri, name)))
            if storage.sha256_file(target) != meta["sha256"]:
                log.warning("checkpoint file does not match its marker", extra={"event": "checkpoint_corrupt",
                                                                                   "uri": uri, "file": name})
                return False
        return True
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.warning(f"checkpoint unreadable: {exc}", extra={"event": "checkpoint_corrupt", "uri": uri})
        return False


def _load_tensors_only(path: Path):
    """torch.load with weights_only=True: tensors and plain containers only. A file that needs any
    other class (a pickle payload that would run code in the trainer pod) is refused, not loaded."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle.UnpicklingError, or anything a crafted file provokes
        raise ValueError(f"{path.name} holds more than tensors and plain values ({type(exc).__name__}); "
                         "refused: checkpoints are loaded without unpickling code") from None


@dataclass
class Loaded:
    state: TrainState
    adapter_state: dict
    optimizer: dict
    scheduler: dict
    rng: dict
    uri: str


def load_latest(output_uri: str) -> Optional[Loaded]:
    """The newest checkpoint that verifies, or None for a fresh start."""
    from safetensors.torch import load_file

    for step in list_steps(output_uri):
        uri = step_uri(output_uri, step)
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            tmp_path = Path(tmp)
            if not _download_verified(uri, tmp_path):
                continue
            try:
                raw = json.loads((tmp_path / "state.json").read_text())
                fields = TrainState.__dataclass_fields__
                return Loaded(
                    state=TrainState(**{k: v for k, v in raw.items() if k in fields}),
                    adapter_state=load_file(str(tmp_path / "adapter.safetensors")),
                    optimizer=_load_tensors_only(tmp_path / "optimizer.pt"),
                    scheduler=_load_tensors_only(tmp_path / "scheduler.pt"),
                    rng=_load_tensors_only(tmp_path / "rng.pt"),
                    uri=uri,
                )
            except (ValueError, TypeError, OSError) as exc:  # refused or malformed: try an older one
                log.warning(f"checkpoint refused: {exc}", extra={"event": "checkpoint_refused", "uri": uri})
                continue
    return None


def prune(output_uri: str, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep` (incomplete newer ones are left alone:
    they may still be being written; older incomplete ones are debris and go too)."""
    complete = list_steps(output_uri)
    doomed = set(complete[keep:])
    if complete:
        oldest_kept = complete[:keep][-1]
        for name in storage.list_keys(checkpoints_uri(output_uri)):
            m = _STEP_DIR.match(name.partition("/")[0])
            if m and int(m.group(1)) < oldest_kept and int(m.group(1)) not in complete:
                doomed.add(int(m.group(1)))
    for step in sorted(doomed):
        uri = step_uri(output_uri, step)
        # Marker first, so a half-deleted folder is never mistaken for a complete checkpoint.
        storage.delete(storage.join(uri, MARKER))
        storage.delete_prefix(uri)
