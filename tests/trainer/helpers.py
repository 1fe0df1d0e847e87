"""Reusable helpers for tests that need a trainer run: tiny datasets, models in S3, configs.

Other test suites (operator, governance, CLI) import these too, so they stay general:
every function takes URIs (s3:// or file://) and returns plain values.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from finetune_trainer import storage

WORDS = ("the quick brown fox jumps over lazy dog model learns from examples capital france paris "
         "answer question translate summarize kubernetes operator dataset adapter").split()


def synthetic_record(rng: random.Random, fmt: str = "chat", min_words: int = 3, max_words: int = 12) -> dict:
    """One learnable example: the answer repeats the prompt's words in reverse order."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
    prompt, answer = "Reverse: " + " ".join(words), " ".join(reversed(words))
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    if fmt == "instruction":
        return {"instruction": prompt, "output": answer}
    if fmt == "completion":
        return {"prompt": prompt + "\n", "completion": answer}
    raise ValueError(f"unknown format {fmt}")


def write_dataset(uri: str, *, fmt: str = "chat", n_train: int = 48, n_eval: int = 12, seed: int = 0,
                  min_words: int = 3, max_words: int = 12, train_lines: Optional[list[str]] = None) -> str:
    """Write a validated-looking dataset folder (train.jsonl, eval.jsonl) at `uri`; returns `uri`.
    `train_lines` replaces the generated train.jsonl lines verbatim (e.g. to plant a malformed line)."""
    rng = random.Random(seed)
    def lines(n: int) -> list[str]:
        return [json.dumps(synthetic_record(rng, fmt, min_words, max_words)) for _ in range(n)]
    train = train_lines if train_lines is not None else lines(n_train)
    storage.write_text(storage.join(uri, "train.jsonl"), "\n".join(train) + "\n")
    storage.write_text(storage.join(uri, "eval.jsonl"), "\n".join(lines(n_eval)) + "\n")
    return uri


def upload_folder(folder: Path, uri: str) -> str:
    """Upload every file of a local folder (e.g. the tiny_model_dir fixture) to `uri`; returns its digest."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(uri, str(path.relative_to(folder))))
    return storage.folder_digest(Path(folder))


def trainer_config(*, model_uri: str, data_uri: str, output_uri: str, fmt: str = "chat",
                   model_digest: Optional[str] = None, data_digest: Optional[str] = None,
                   method: str = "lora", training: Optional[dict] = None, lora: Optional[dict] = None,
                   quantization: Optional[dict] = None, job: str = "test-job", namespace: str = "default",
                   **extra: Any):
    """A TrainerConfig sized for tests: tiny steps, short rows, fp32, no metrics port."""
    from finetune_operator.api.trainer_config import TrainerConfig

    settings = {"maxSteps": 6, "batchSize": 4, "maxSeqLength": 96, "learningRate": 1e-2,
                "warmupRatio": 0.0, "lrScheduler": "constant", "precision": "fp32",
                "gradientCheckpointing": False, "evalEverySteps": 100, "checkpointEverySteps": 100,
                "seed": 7}
    settings.update(training or {})
    return TrainerConfig.model_validate({
        "job": {"namespace": namespace, "name": job},
        "baseModel": {"uri": model_uri, **({"digest": model_digest} if model_digest else {})},
        "data": {"uri": data_uri, "format": fmt, **({"digest": data_digest} if data_digest else {})},
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
        **({"quantization": quantization} if quantization else {}),
        "training": settings,
        "outputURI": output_uri,
        "metricsPort": 0,
        "progressIntervalSeconds": 1,
        **extra,
    })


def write_config(cfg, path: Path) -> Path:
    Path(path).write_text(cfg.model_dump_json(exclude_none=True))
    return Path(path)


def trainer_command(config_path: Path) -> list[str]:
    """argv of `finetune-trainer train --config ...`: the installed console script next to this
    interpreter (what the image runs), else the same entry point through `python -m`."""
    script = Path(sys.executable).parent / "finetune-trainer"
    if script.is_file():
        return [str(script), "train", "--config", str(config_path)]
    return [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config_path)]


def run_trainer(config_path: Path, env: Optional[dict] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the trainer as a subprocess (how the Job runs it); returns the completed process."""
    return subprocess.run(trainer_command(config_path), env=env, capture_output=True, text=True, timeout=timeout)


def read_json(uri: str) -> Any:
    return json.loads(storage.read_text(uri))
