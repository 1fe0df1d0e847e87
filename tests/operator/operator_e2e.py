"""Helpers of the operator e2e tests: manifests, test data, and the in-process operator.

A module of its own (not conftest.py: several conftest modules exist, so importing "conftest"
is ambiguous). tests/operator/conftest.py re-exports these for harnesses that load it by path.
"""

from __future__ import annotations

import contextlib
import json
import random
from typing import Iterator

API = "finetune.dev/v1alpha1"
SECRET = "s3-creds"
OPERATOR_NAMESPACE = "finetune-system"


@contextlib.contextmanager
def running_operator() -> Iterator[object]:
    """The real operator (finetune_operator.handlers) in-process, standalone, all namespaces."""
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--all-namespaces", "--module", "finetune_operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output



# --- objects ---------------------------------------------------------------------------------

def write_raw_dataset(bucket: str, n: int = 40, key: str = "raw/data.jsonl", extra_lines: tuple = ()) -> str:
    from finetune_trainer import storage
    from trainer.helpers import synthetic_record

    rng = random.Random(1)
    lines = [json.dumps(synthetic_record(rng, "chat")) for _ in range(n)] + list(extra_lines)
    uri = f"s3://{bucket}/{key}"
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


def dataset_manifest(name: str, source: str, min_examples: int = 10, **spec) -> dict:
    return {"apiVersion": API, "kind": "Dataset", "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": {"uri": source}, "format": "chat", "evaluation": {"fraction": 0.2},
                     "provenance": {"origin": "tests", "license": "CC0-1.0", "consent": "not-required"},
                     "curation": {"minExamples": min_examples, "maxInvalidLines": 0, "piiPolicy": "reject"},
                     **spec}}


def finetunejob_manifest(name: str, dataset: str, model_uri: str, output_uri: str, **spec) -> dict:
    training = {"maxSteps": 6, "batchSize": 4, "maxSeqLength": 96, "learningRate": 0.01, "warmupRatio": 0.0,
                "lrScheduler": "constant", "precision": "fp32", "gradientCheckpointing": False,
                "evalEverySteps": 100, "checkpointEverySteps": 2, "seed": 7}
    training.update(spec.pop("training", {}))
    return {"apiVersion": API, "kind": "FineTuneJob", "metadata": {"name": name, "namespace": "default"},
            "spec": {"baseModel": {"uri": model_uri}, "datasetRef": {"name": dataset}, "method": "lora",
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
                     "training": training, "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi"},
                     "output": {"uri": output_uri}, **spec}}


def phase(cluster, name: str, kind: str = "finetunejobs") -> str:
    obj = cluster.get(API, kind, "default", name)
    return ((obj or {}).get("status") or {}).get("phase", "")


def ready_dataset(cluster, bucket: str, name: str = "ready") -> None:
    """A Dataset that was already validated (as after an operator restart): no validation Job runs."""
    from trainer.helpers import write_dataset

    uri = write_dataset(f"s3://{bucket}/validated/{name}")
    manifest = dataset_manifest(name, f"s3://{bucket}/raw/unused.jsonl")
    manifest["status"] = {"phase": "Ready", "observedGeneration": 1, "validatedURI": uri,
                          "digest": "sha256:" + "0" * 64, "stats": {"examples": 48}}
    cluster.create(manifest)


def status_of(cluster, name: str) -> dict:
    return (cluster.ftj(name) or {}).get("status") or {}
