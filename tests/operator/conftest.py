"""End-to-end fixtures: the emulated API server, the fake kubelet, S3 (moto) and the real operator.

The operator runs for real in-process (kopf.testing.KopfRunner with finetune_operator.handlers),
logs in with a kubeconfig that points at the emulator, and is configured through FINETUNE_*
variables exactly as the Helm chart configures it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterator

import pytest

# Read when the handlers module is imported (the progress timer's interval): set it first.
os.environ["FINETUNE_PROGRESS_INTERVAL"] = "1"
os.environ["FINETUNE_METRICS_PORT"] = "0"
os.environ["FINETUNE_HEALTH_PORT"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ (kubelet.py, trainer helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/operator (kube_emulator.py)

from kubelet import FakeKubelet  # noqa: E402
from kube_emulator import Cluster  # noqa: E402

API = "finetune.dev/v1alpha1"
SECRET = "s3-creds"


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


@pytest.fixture()
def env(cluster, s3_server, bucket, tmp_path, monkeypatch) -> dict:
    """Operator configuration + a Secret with the S3 credentials (only Jobs read it, via secretKeyRef)."""
    values = {
        "KUBECONFIG": str(cluster.write_kubeconfig(tmp_path / "kubeconfig")),
        "FINETUNE_ARTIFACT_STORE": f"s3://{bucket}/store",
        "FINETUNE_S3_ENDPOINT": s3_server,
        "FINETUNE_S3_CREDENTIALS_SECRET": SECRET,
        "FINETUNE_TRAINER_IMAGE": "ghcr.io/finetune-operator/trainer:test",
        "FINETUNE_DEFAULT_GOVERNANCE": json.dumps({"required": []}),
        "FINETUNE_JOB_ENV": json.dumps({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    cluster.secret(SECRET, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    return {"bucket": bucket, "s3": s3_server, **values}


@pytest.fixture()
def kubelet(cluster, tmp_path) -> Iterator[FakeKubelet]:
    k = FakeKubelet(cluster.url, tmp_path / "pods").start()
    yield k
    k.stop()


@contextlib.contextmanager
def running_operator() -> Iterator[object]:
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--all-namespaces", "--module", "finetune_operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output


@pytest.fixture()
def operator(env, kubelet) -> Iterator[object]:
    with running_operator() as runner:
        yield runner


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


@pytest.fixture()
def model_uri(env, tiny_model_dir) -> str:
    from trainer.helpers import upload_folder

    uri = f"s3://{env['bucket']}/models/tiny"
    upload_folder(tiny_model_dir, uri)
    return uri


def phase(cluster: Cluster, name: str, kind: str = "finetunejobs") -> str:
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
