"""End-to-end fixtures: the emulated API server, the fake kubelet, S3 (moto) and the real operator.

The operator runs for real in-process (kopf.testing.KopfRunner with finetune_operator.handlers),
logs in with a kubeconfig that points at the emulator, and is configured through FINETUNE_*
variables exactly as the Helm chart configures it.
"""

from __future__ import annotations

import json
import os
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
# Re-exported for harnesses that load this file by path (tests/test_prometheus.py).
from operator_e2e import (API, OPERATOR_NAMESPACE, SECRET, dataset_manifest, finetunejob_manifest, phase,  # noqa: E402,F401
                          ready_dataset, running_operator, status_of, write_raw_dataset)


def pytest_collection_modifyitems(items):
    """End-to-end tests here drive several threads and subprocesses against kmock's emulator. The
    flake seen earlier had a cause in our test helper (the fake kubelet's garbage collector deleted a
    new Job and ConfigMap as orphans; fixed) and none has been seen since in repeated runs; one rerun
    stays as a guard, and pytest reports every rerun, so a new flake is visible, not hidden."""
    for item in items:
        if "tests/operator/" in str(item.fspath):
            item.add_marker(pytest.mark.flaky(reruns=1))


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
        # Governance Jobs run here, with the platform's S3 Secret and the signing key the operator makes.
        "FINETUNE_NAMESPACE": OPERATOR_NAMESPACE,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    cluster.secret(SECRET, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    cluster.secret(SECRET, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                   namespace=OPERATOR_NAMESPACE)
    return {"bucket": bucket, "s3": s3_server, **values}


@pytest.fixture()
def kubelet(cluster, tmp_path) -> Iterator[FakeKubelet]:
    k = FakeKubelet(cluster.url, tmp_path / "pods").start()
    yield k
    k.stop()


@pytest.fixture()
def operator(env, kubelet) -> Iterator[object]:
    with running_operator() as runner:
        yield runner


@pytest.fixture()
def model_uri(env, tiny_model_dir) -> str:
    from trainer.helpers import upload_folder

    uri = f"s3://{env['bucket']}/models/tiny"
    upload_folder(tiny_model_dir, uri)
    return uri
