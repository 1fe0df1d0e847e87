"""Base models for local runs: the cached tiny model (`--tiny`), the quickstart's SmolLM2
conversion, and the before/after sample that shows what an adapter changed.

torch / transformers are imported inside the functions: `ftctl status` and friends
must start fast and work without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .errors import FtctlError

#: The quickstart's base model folder (examples/quickstart/finetunejob.yaml); made by
#: finetune_trainer.convert (what hack/convert-smollm2.py runs) when missing.
SMOLLM2_DIR = Path(".finetune/models/smollm2-135m-instruct")
#: Shape of the `--tiny` model (see finetune_trainer.tiny); part of its cache key.
TINY_SHAPE = {"hidden_size": 64, "layers": 2, "vocab_size": 512}


def tiny_model_name() -> str:
    return "tiny-" + "-".join(f"{k}{v}" for k, v in sorted(TINY_SHAPE.items()))


def tiny_model(state_dir: Path) -> Path:
    """Build the tiny model once into state_dir/models/ (temp folder + rename: never half-built)."""
    from finetune_trainer.tiny import build_tiny_model

    name = tiny_model_name()
    target = state_dir / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        build_tiny_model(tmp, **TINY_SHAPE)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # not a concurrent build that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_vlm(state_dir: Path) -> Path:
    """The tiny LLaVA of finetune_trainer.tiny_vlm (image-text jobs), built once like tiny_model."""
    from finetune_trainer.tiny_vlm import build_tiny_vlm

    target = state_dir / "models" / "tiny-llava-32px"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llava.", dir=target.parent))
    try:
        from finetune_trainer.boards import QUADRANTS, QUESTION, answer

        build_tiny_vlm(tmp, extra_text=[QUESTION, *(answer(q) for q in (None, *QUADRANTS))])
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_quickstart_model(path: Path, cwd: Path) -> bool:
    return path.resolve() == (cwd / SMOLLM2_DIR).resolve()


def quickstart_model_ready(path: Path) -> bool:
    from finetune_trainer.convert import is_converted

    return is_converted(path)


def ensure_quickstart_model(path: Path, log_path: Path) -> None:
    """Convert SmolLM2-135M-Instruct into `path` unless a complete conversion is there (B's converter)."""
    if quickstart_model_ready(path):
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # What hack/convert-smollm2.py runs, in a subprocess: torch's memory goes away with it.
        code = subprocess.call([sys.executable, "-c", "import sys; from finetune_trainer.convert import main; "
                                "sys.exit(main(sys.argv[1:]))", "--out", str(path)],
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not quickstart_model_ready(path):
        from .executor import last_error

        raise FtctlError(f"converting SmolLM2-135M-Instruct into {path} failed (exit {code}): "
                         f"{last_error(log_path) or 'see ' + str(log_path)}")


def local_path(uri: str) -> Optional[Path]:
    return Path(uri[len("file://"):]) if uri.startswith("file://") else None


def read_json(uri: str) -> Optional[dict]:
    from finetune_trainer import storage

    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None


def newest_checkpoint_step(output_uri: str) -> Optional[int]:
    """The step of the newest complete checkpoint (checkpoint.json is written last) under a run folder."""
    from finetune_trainer import storage

    steps = [int(key.split("/")[0][len("step-"):]) for key in storage.list_keys(f"{output_uri}/checkpoints")
             if key.startswith("step-") and key.endswith("/checkpoint.json") and key.split("/")[0][5:].isdigit()]
    return max(steps) if steps else None
