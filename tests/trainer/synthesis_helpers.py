"""A validated seed set, a generator model and a SynthesisConfig, for the SyntheticDataset tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from finetune_operator.api.dataset import DatasetSpec
from finetune_operator.api.synthetic import SynthesisConfig

from finetune_trainer import storage
from finetune_trainer.validate import validate_text

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_SEEDS = REPO / "examples/quickstart/data/support-answers.jsonl"


def write_seed(folder_uri: str, source: Path = QUICKSTART_SEEDS, fmt: str = "instruction") -> str:
    """Validate `source` as the validation Job does and write train/eval.jsonl to the folder; the digest."""
    spec = DatasetSpec.model_validate({
        "source": {"uri": source.as_uri()}, "format": fmt, "evaluation": {"fraction": 0.2, "seed": 42},
        "provenance": {"origin": "the quickstart", "license": "CC0-1.0"}, "curation": {"minExamples": 5}})
    result = validate_text(source.read_text(), spec)
    assert result.valid, result.message
    storage.write_text(storage.join(folder_uri, "train.jsonl"), result.train_jsonl)
    storage.write_text(storage.join(folder_uri, "eval.jsonl"), result.eval_jsonl)
    return result.digest


def synthesis_config(*, seed_uri: str, seed_digest: str, model_uri: str, work_uri: str,
                     model_digest: Optional[str] = None, adapter_uri: Optional[str] = None,
                     adapter_digest: Optional[str] = None, spec: Optional[dict] = None,
                     eval_set_uris: tuple[str, ...] = ()) -> SynthesisConfig:
    model = {"uri": model_uri, **({"digest": model_digest} if model_digest else {})}
    return SynthesisConfig.model_validate({
        "namespace": "default", "name": "grown", "workURI": work_uri,
        "spec": {"seed": {"dataset": "seed"}, "generator": {"baseModel": model}, "examples": 4,
                 "format": "instruction", "sampling": {"maxNewTokens": 24, "seed": 5}, **(spec or {})},
        "inputs": {"seedURI": seed_uri, "seedFormat": "instruction", "seedDigest": seed_digest,
                   "seedLicense": "CC0-1.0", "baseModel": model, "adapterURI": adapter_uri,
                   "adapterDigest": adapter_digest, "evalSetURIs": list(eval_set_uris)},
    })


def save(config: SynthesisConfig, path: Path) -> str:
    path.write_text(config.model_dump_json(exclude_none=True))
    return str(path)


def read_json(uri: str):
    return json.loads(storage.read_text(uri))
