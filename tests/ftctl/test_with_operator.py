"""The cluster commands end to end, with the operator running.

The real operator (Kopf, finetune_operator.handlers) runs against the emulated API server;
the operator tests' fake kubelet runs its Jobs (the real `finetune-trainer` commands) on the
tiny model in moto's S3. ftctl only submits, watches, reads logs and reports, and approves.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_operator.ftctl.main import app

from .conftest import NS

os.environ.setdefault("FINETUNE_PROGRESS_INTERVAL", "1")  # read when the handlers are imported
os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
os.environ.setdefault("FINETUNE_HEALTH_PORT", "0")

SECRET = "s3-creds"


def cli(k8s, *args: str):
    return CliRunner().invoke(app, ["--kubeconfig", str(k8s.kubeconfig), *args])


def serve_pod_logs(k8s, pods_dir: Path) -> None:
    """The kubelet's log endpoint: the fake kubelet writes each pod's output to <pod>/pod.log."""
    async def pod_log(request):
        pod = request.url.path.split("/")[-2]
        path = pods_dir / pod / "pod.log"
        return path.read_bytes() if path.exists() else b""

    k8s.kmock[re.compile(rf"/api/v1/namespaces/{NS}/pods/[^/]+/log")] << pod_log


@pytest.fixture()
def operator_env(k8s, s3_server, bucket, tmp_path, monkeypatch) -> dict:
    for key, value in {
        "KUBECONFIG": str(k8s.kubeconfig),
        "FINETUNE_ARTIFACT_STORE": f"s3://{bucket}/store",
        "FINETUNE_S3_ENDPOINT": s3_server,
        "FINETUNE_S3_CREDENTIALS_SECRET": SECRET,
        # A fast declared subset: the governance checks themselves are tested in tests/governance.
        "FINETUNE_DEFAULT_GOVERNANCE": json.dumps({"required": ["provenance"]}),
        "FINETUNE_JOB_ENV": json.dumps({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}),
    }.items():
        monkeypatch.setenv(key, value)
    k8s.cluster.secret(SECRET, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}, namespace=NS)
    # Governance Jobs run in the operator's namespace (the config's default), with the platform's S3 Secret.
    k8s.cluster.secret(SECRET, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                       namespace="finetune-system")
    return {"bucket": bucket}


@pytest.fixture()
def running(k8s, operator_env, tmp_path):
    from kopf.testing import KopfRunner
    from kubelet import FakeKubelet

    kubelet = FakeKubelet(k8s.url, tmp_path / "pods").start()
    serve_pod_logs(k8s, tmp_path / "pods")
    try:
        with KopfRunner(["run", "--standalone", "--all-namespaces", "--module", "finetune_operator.handlers"],
                        timeout=60) as runner:
            yield kubelet
        assert runner.exit_code == 0, runner.output
    finally:
        kubelet.stop()


def manifests(tmp_path: Path, bucket: str, model_uri: str) -> Path:
    from finetune_trainer import storage

    rows = [{"instruction": f"What does step {i} of the runbook say?", "output": f"FTO: step {i} says check the logs."}
            for i in range(30)]
    storage.write_text(f"s3://{bucket}/raw/runbook.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    text = f"""
apiVersion: finetune.dev/v1alpha1
kind: Dataset
metadata: {{name: runbook}}
spec:
  source: {{uri: "s3://{bucket}/raw/runbook.jsonl"}}
  format: instruction
  provenance: {{origin: tests, license: CC0-1.0, consent: not-required}}
---
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: runbook-assistant}}
spec:
  baseModel: {{uri: "{model_uri}"}}
  datasetRef: {{name: runbook}}
  lora: {{r: 4, alpha: 8, dropout: 0.0}}
  training: {{maxSteps: 4, batchSize: 4, maxSeqLength: 64, precision: fp32, gradientCheckpointing: false,
             evalEverySteps: 100, checkpointEverySteps: 2}}
  resources: {{gpusPerNode: 0}}
  output: {{uri: "s3://{bucket}/runs/runbook-assistant"}}
  promotion: {{mode: manual}}
"""
    path = tmp_path / "runbook.yaml"
    path.write_text(text)
    return path


def test_submit_watch_logs_report_approve_with_the_operator(k8s, operator_env, running, tmp_path, tiny_model_dir):
    from trainer.helpers import upload_folder

    bucket = operator_env["bucket"]
    model_uri = f"s3://{bucket}/models/tiny"
    upload_folder(tiny_model_dir, model_uri)

    submitted = cli(k8s, "submit", "-f", str(manifests(tmp_path, bucket, model_uri)))
    assert submitted.exit_code == 0, submitted.output
    assert "finetunejob.finetune.dev/runbook-assistant created" in submitted.output

    waited = cli(k8s, "watch", "runbook-assistant", "--interval", "0.5", "--timeout", "240")
    assert waited.exit_code == 0, waited.output + running.log("runbook-assistant")
    assert "runbook-assistant: AwaitingApproval" in waited.output

    table = cli(k8s, "status")
    row = next(line for line in table.output.splitlines() if "runbook-assistant" in line)
    assert "AwaitingApproval" in row and "4/4" in row and "passed (1 checks)" in row

    report = cli(k8s, "report", "runbook-assistant")
    assert report.exit_code == 0 and "Governance: passed" in report.output and "provenance" in report.output

    logs = cli(k8s, "logs", "runbook-assistant")
    assert logs.exit_code == 0, logs.output
    events = [json.loads(line) for line in logs.output.splitlines() if line.startswith("{")]
    assert any(e.get("logger", "").startswith("finetune_trainer.train") for e in events)

    job = k8s.cluster.get("finetune.dev/v1alpha1", "finetunejobs", NS, "runbook-assistant")
    digest = job["status"]["adapter"]["digest"]
    approved = cli(k8s, "approve", "runbook-assistant", "--digest", digest)
    assert approved.exit_code == 0, approved.output

    done = cli(k8s, "watch", "runbook-assistant", "--interval", "0.5", "--timeout", "60")
    assert done.exit_code == 0, done.output
    assert "runbook-assistant: Succeeded" in done.output
    final = k8s.cluster.get("finetune.dev/v1alpha1", "finetunejobs", NS, "runbook-assistant")["status"]
    assert final["promotion"]["state"] == "Promoted" and final["promotion"]["approvedBy"] == "alice"
