"""`ftctl run`: the whole pipeline on this machine, through the real command line.

The trainer, validation and governance commands run for real as subprocesses on the
session's tiny model; nothing of ours is mocked.
"""

from __future__ import annotations

import json

import pytest
import yaml

from finetune_operator.ftctl.manifests import load
from finetune_trainer import storage

from .conftest import REPO, ftctl, write_manifests

INVALID = sorted((REPO / "tests" / "manifests" / "invalid").glob("*.yaml"))


def quickstart_docs() -> list[dict]:
    return [yaml.safe_load((REPO / "examples" / "quickstart" / f).read_text()) for f in ("dataset.yaml",
                                                                                        "finetunejob.yaml")]


def fast_policy(*required: str, **thresholds) -> dict:
    """A GovernancePolicy requiring only a fast subset of checks (declared, not hidden)."""
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy", "metadata": {"name": "fast"},
            "spec": {"required": list(required), **thresholds}}


def test_quickstart_runs_end_to_end_with_tiny(tiny_workdir):
    """The quickstart manifests as shipped, every governance check, promotion and samples."""
    proc = ftctl("run", "examples/quickstart/", "--tiny", "--samples", "2", cwd=tiny_workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "kind: Dataset" in out and "phase: Ready" in out
    assert "kind: FineTuneJob" in out and "phase: Succeeded" in out
    assert "Governance: passed" in out
    for check in ("evaluation", "bias", "provenance", "pii", "explainability"):
        assert check in out
    assert "What the adapter changed" in out
    # The alias the operator would write points at the adapter the trainer produced.
    run = tiny_workdir / ".finetune" / "runs" / "support-assistant-tiny"  # --tiny keeps its own outputs
    result = json.loads((run / "result.json").read_text())
    alias = json.loads((run / "aliases" / "support-assistant.json").read_text())
    assert alias["adapterDigest"] == result["digest"]
    assert alias["adapterURI"] == result["adapterURI"]
    assert "promoted as support-assistant" in out
    # Datasets are validated into the local artifact store.
    report = json.loads(next((tiny_workdir / ".finetune" / "datasets").rglob("report.json")).read_text())
    assert report["valid"] is True


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_rejected_with_the_schema_message(path, tmp_path):
    """In-process (fast): the same load step `ftctl run` starts with; the message names the field."""
    from finetune_operator.ftctl.errors import FtctlError

    expected = path.read_text().splitlines()[0].removeprefix("# expect:").strip()
    with pytest.raises(FtctlError) as err:
        load([path])
    assert expected in str(err.value)
    assert err.value.exit_code == 2


def test_run_with_an_invalid_manifest_does_no_work(tmp_path):
    bad = REPO / "tests" / "manifests" / "invalid" / "05-qlora-without-quantization.yaml"
    proc = ftctl("run", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "spec.quantization" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / ".finetune").exists()


def test_invalid_dataset_stops_with_the_reasons(tmp_path):
    data = tmp_path / "data.jsonl"
    good = [json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) for i in range(30)]
    data.write_text("\n".join(good[:3] + ['{"instruction": "no output"}', "not json"] + good[3:]) + "\n")
    dataset, job = quickstart_docs()
    dataset["spec"]["source"]["uri"] = "file://data.jsonl"
    job["spec"]["baseModel"]["uri"] = "file://models/never-used"
    write_manifests(tmp_path / "run.yaml", dataset, job)
    proc = ftctl("run", "run.yaml", "--tiny", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert "Dataset support-answers is Invalid" in error
    assert "4" in error and "5" in error  # the offending line numbers
    assert "phase: Invalid" in proc.stdout
    assert not (tmp_path / ".finetune" / "runs").exists()  # no training started


def test_blocked_promotion_exits_non_zero_and_names_the_failing_check(tiny_workdir, tmp_path):
    dataset, job = quickstart_docs()
    job["metadata"]["name"] = "blocked"
    job["spec"]["output"]["uri"] = "file://.finetune/runs/blocked"
    # Impossible for 8 tiny steps: a 90% lower eval loss than the base model.
    policy = fast_policy("evaluation", "provenance", evaluation={"minRelativeImprovement": 0.9})
    write_manifests(tiny_workdir / "blocked.yaml", policy, dataset, job)
    proc = ftctl("run", "blocked.yaml", "--tiny", "--samples", "0", cwd=tiny_workdir)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr
    assert "Governance: BLOCKED" in proc.stdout
    assert "failing checks: evaluation" in proc.stderr
    assert "phase: Failed" in proc.stdout and "state: Blocked" in proc.stdout
    assert not (tiny_workdir / ".finetune" / "runs" / "blocked-tiny" / "aliases").exists()


def test_manual_promotion_awaits_approval_then_promotes_after_rerun(tiny_workdir):
    dataset, job = quickstart_docs()
    job["metadata"]["name"] = "manual"
    job["spec"]["output"]["uri"] = "file://.finetune/runs/manual"
    job["spec"]["promotion"] = {"mode": "manual"}
    policy = fast_policy("provenance")
    path = write_manifests(tiny_workdir / "manual.yaml", policy, dataset, job)
    first = ftctl("run", "manual.yaml", "--tiny", "--samples", "0", cwd=tiny_workdir)
    assert first.returncode == 0, first.stderr
    assert "phase: AwaitingApproval" in first.stdout
    digest = json.loads((tiny_workdir / ".finetune" / "runs" / "manual-tiny" / "result.json").read_text())["digest"]
    assert digest in first.stdout
    job["spec"]["promotion"]["approval"] = {"digest": digest, "approvedBy": "reviewer"}
    # Meanwhile the policy changed: the checks run again (run 2) before the approval counts.
    write_manifests(path, fast_policy("provenance", "pii"), dataset, job)
    second = ftctl("run", "manual.yaml", "--tiny", "--samples", "0", cwd=tiny_workdir)
    assert second.returncode == 0, second.stderr
    assert "phase: Succeeded" in second.stdout and "approvedBy: reviewer" in second.stdout
    assert "TrainerJobCreated" not in second.stdout  # the approved adapter is not trained again
    assert "GovernanceRerun" in second.stdout and "runs: 2" in second.stdout
    assert "pii" in second.stdout
    assert (tiny_workdir / ".finetune" / "runs" / "manual-tiny" / "aliases" / "manual.json").exists()


# Ctrl-C and SIGTERM (checkpoint, exit code, nothing left running, resume): tests/ftctl/test_signals.py


def test_run_on_s3_storage(tiny_workdir, bucket):
    """s3:// data and outputs with an endpoint from the AWS_* environment (the moto server)."""
    dataset, job = quickstart_docs()
    storage.write_text(f"s3://{bucket}/raw/support.jsonl",
                       (REPO / "examples/quickstart/data/support-answers.jsonl").read_text())
    dataset["spec"]["source"]["uri"] = f"s3://{bucket}/raw/support.jsonl"
    dataset["spec"]["output"] = {"uri": f"s3://{bucket}/validated/support"}
    job["metadata"]["name"] = "on-s3"
    job["spec"]["output"]["uri"] = f"s3://{bucket}/runs/on-s3"
    write_manifests(tiny_workdir / "s3.yaml", fast_policy("provenance", "pii"), dataset, job)
    proc = ftctl("run", "s3.yaml", "--tiny", "--samples", "1", cwd=tiny_workdir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    result = json.loads(storage.read_text(f"s3://{bucket}/runs/on-s3-tiny/result.json"))
    alias = json.loads(storage.read_text(f"s3://{bucket}/runs/on-s3-tiny/aliases/support-assistant.json"))
    assert alias["adapterDigest"] == result["digest"] and result["adapterURI"].startswith(f"s3://{bucket}/")
    assert storage.exists(f"s3://{bucket}/validated/support/report.json")


def test_transient_failures_are_retried_like_a_job_then_reported(tmp_path):
    """S3 unreachable (exit 4): retried up to the validation Job's backoffLimit, then one clear line."""
    dataset, _ = quickstart_docs()
    dataset["spec"]["source"]["uri"] = "s3://unreachable-bucket/raw.jsonl"
    write_manifests(tmp_path / "ds.yaml", dataset)
    proc = ftctl("run", "ds.yaml", cwd=tmp_path,
                 env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "FINETUNE_S3_MAX_ATTEMPTS": "1",
                      "FINETUNE_S3_CONNECT_TIMEOUT": "1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("retrying") == 2  # backoffLimit 2 of the operator's validation Job
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Dataset support-answers is Failed") and "S3 unreachable" in error
