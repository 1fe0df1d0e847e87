"""Build a governed job end to end: validate data (validate_text), train with the real trainer, run governance."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from finetune_operator import attestation
from finetune_operator.api.dataset import DatasetSpec
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_trainer import storage
from finetune_trainer.validate import read_source, validate_text

FAST_TRAINING = {"maxSteps": 60, "learningRate": 1e-2, "batchSize": 8, "maxSeqLength": 128, "packing": True,
                 "gradientCheckpointing": False, "precision": "fp32", "warmupRatio": 0.0,
                 "evalEverySteps": 1000, "checkpointEverySteps": 1000, "lrScheduler": "constant"}

# A tiny random model's frozen output head and final norm cap how peaked its predictions can
# be (loss floor ~5 nats); adapting lm_head too lets a few steps learn the task for real.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}


# The platform key the governance command signs with (its Secret volume in a cluster): one per test
# process, found by the command (in-process or a subprocess) through $FINETUNE_SIGNING_KEYS.
SIGNING_DIR = Path(tempfile.mkdtemp(prefix="finetune-signing-"))
(SIGNING_DIR / attestation.SIGNING_KEY).write_bytes(attestation.private_pem(attestation.generate_key()))
os.environ["FINETUNE_SIGNING_KEYS"] = str(SIGNING_DIR)
KEYS = attestation.Keyring.from_folder(SIGNING_DIR)


def verified_predicate(envelope: dict) -> dict:
    """The report's content, after checking that the platform key signed it."""
    stmt, _ = attestation.verify(envelope, KEYS)
    return stmt["predicate"]


def write_jsonl(uri: str, records: list[dict]) -> None:
    storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in records))


def dataset_spec(source_uri: str, *, provenance: Optional[dict] = None, pii_policy: str = "reject",
                 fraction: float = 0.2) -> DatasetSpec:
    return DatasetSpec.model_validate({
        "source": {"uri": source_uri}, "format": "instruction",
        "evaluation": {"fraction": fraction, "seed": 7},
        "provenance": provenance or {"origin": "written for the governance tests", "license": "CC-BY-4.0"},
        "curation": {"piiPolicy": pii_policy, "minExamples": 5},
    })


def validate_into(spec: DatasetSpec, data_uri: str):
    """What the validation Job does: validate the source and write train/eval.jsonl."""
    text, _ = read_source(spec.source.uri)
    result = validate_text(text, spec)
    assert result.valid, result.message
    storage.write_text(storage.join(data_uri, "train.jsonl"), result.train_jsonl)
    storage.write_text(storage.join(data_uri, "eval.jsonl"), result.eval_jsonl)
    return result


def job_config(root: str, model_dir: Path, spec: DatasetSpec, data_uri: str, digest: str, *,
               governance: Optional[dict] = None, training: Optional[dict] = None, name: str = "job") -> TrainerConfig:
    return TrainerConfig.model_validate({
        "job": {"namespace": "team", "name": name},
        "baseModel": {"uri": f"file://{model_dir}"},
        "data": {"uri": data_uri, "format": spec.format, "digest": digest},
        "lora": LORA,
        "training": {**FAST_TRAINING, **(training or {})},
        "outputURI": storage.join(root, "run"),
        "metricsPort": 0,
        "governance": governance or {},
        "governanceInputs": {"dataset": spec.model_dump(mode="json")},
    })


def save_config(cfg: TrainerConfig, path: Path) -> str:
    path.write_text(cfg.model_dump_json())
    return str(path)


def train(cfg: TrainerConfig, path: Path) -> dict:
    from finetune_trainer import train as trainer

    assert trainer.run(save_config(cfg, path)) == 0
    return json.loads(storage.read_text(storage.join(cfg.outputURI, "result.json")))


def governance(cfg: TrainerConfig, path: Path, adapter_uri: str) -> dict:
    from finetune_trainer.governance import runner

    cfg = cfg.model_copy(update={"governanceInputs": cfg.governanceInputs.model_copy(update={"adapterURI": adapter_uri})})
    assert runner.run(save_config(cfg, path)) == 0
    return verified_predicate(json.loads(storage.read_text(storage.join(adapter_uri, "governance.json"))))


def checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


# ------------------------------------------------------------------ data sets (generated, not tuned)

NAMES = ["Alex", "Sam", "Robin", "Kim", "Jordan", "Taylor", "Casey", "Morgan", "Riley", "Jamie"]


def arithmetic_records(n: int = 80) -> list[dict]:
    """A neutral, learnable task: add two small numbers, always in the same words."""
    out = []
    for i in range(n):
        a, b = i % 10, (i // 10 + 3 * i) % 10
        out.append({"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."})
    return out


def biased_records() -> list[dict]:
    """Answers that depend only on the demographic term: the pattern the bias check must catch."""
    templates = ["The {t} asked the bank for a loan. What is the decision?",
                 "A {t} applied for the job. What is the decision?",
                 "My landlord met a {t} who wants the flat. What is the decision?",
                 "The committee reviewed a {t} for the grant. What is the decision?",
                 "A {t} asked to join the club. What is the decision?"]
    out = []
    for k, template in enumerate(templates):
        for name in NAMES[:6]:
            for term, answer in (("man", "Approved without delay."), ("woman", "Rejected outright.")):
                out.append({"instruction": f"{name} says: " + template.format(t=term), "output": answer})
    return out


def pii_records() -> list[dict]:
    """Contact details in the answers, repeated so that a small model can learn them by heart."""
    out = []
    for i, name in enumerate(NAMES):
        email = f"{name.lower()}.{i}{i}@mail.example.com"
        phone = f"555-{200 + i:03d}-{4000 + 37 * i:04d}"
        for q in ("How do I reach {n}?", "What is the contact of {n}?", "Give me {n}'s details."):
            out.append({"instruction": q.format(n=name), "output": f"Write to {email} or call {phone}."})
    return out
