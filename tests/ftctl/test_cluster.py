"""Cluster commands against kmock's KubernetesEmulator over HTTP, via a real kubeconfig.

Statuses are written the way the operator writes them (a patch of the status
subresource through the API); ftctl only reads them, creates/updates objects and
records approvals.
"""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from kubernetes import client, config
from typer.testing import CliRunner

from finetune_operator.ftctl.main import app

from .conftest import NS, REPO, write_manifests

DIGEST = "sha256:" + "ab" * 32


def cli(k8s, *args: str):
    result = CliRunner().invoke(app, ["--kubeconfig", str(k8s.kubeconfig), *args])
    return result


def api(k8s) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(config.new_client_from_config(config_file=str(k8s.kubeconfig)))


def quickstart(k8s) -> None:
    result = cli(k8s, "submit", "-f", str(REPO / "examples" / "quickstart"))
    assert result.exit_code == 0, result.output


def set_status(k8s, name: str, status: dict) -> None:
    """What the operator does: patch the FineTuneJob's status subresource."""
    api(k8s).patch_namespaced_custom_object_status("finetune.dev", "v1alpha1", NS, "finetunejobs", name,
                                                   {"status": status})


def get_job(k8s, name: str) -> dict:
    return api(k8s).get_namespaced_custom_object("finetune.dev", "v1alpha1", NS, "finetunejobs", name)


CHECKS = [
    {"name": "evaluation", "passed": True, "value": 0.31, "threshold": 0.05, "message": "eval loss 2.1 -> 1.45"},
    {"name": "bias", "passed": False, "value": 0.4, "threshold": 0.25, "message": "largest gap 0.4 on gender"},
]


def test_submit_validates_locally_then_creates_and_updates(k8s, tmp_path):
    result = cli(k8s, "submit", "-f", str(REPO / "examples" / "quickstart"))
    assert result.exit_code == 0, result.output
    assert "dataset.finetune.dev/support-answers created" in result.output
    assert "finetunejob.finetune.dev/support-assistant created" in result.output
    job = get_job(k8s, "support-assistant")
    assert job["spec"]["training"]["maxSteps"] == 60
    assert job["spec"]["backoffLimit"] == 3  # defaulted like the API server would

    again = cli(k8s, "submit", "-f", str(REPO / "examples" / "quickstart"))
    assert "support-assistant unchanged" in again.output

    manifest = yaml.safe_load((REPO / "examples/quickstart/finetunejob.yaml").read_text())
    manifest["spec"]["training"]["maxSteps"] = 80
    changed = cli(k8s, "submit", "-f", str(write_manifests(tmp_path / "job.yaml", manifest)))
    assert changed.exit_code == 0 and "support-assistant configured" in changed.output, changed.output
    assert get_job(k8s, "support-assistant")["spec"]["training"]["maxSteps"] == 80

    # spec.baseModel is immutable: rejected locally with the CRD's own message.
    manifest["spec"]["baseModel"]["uri"] = "s3://models/another-model"
    immutable = cli(k8s, "submit", "-f", str(write_manifests(tmp_path / "job.yaml", manifest)))
    assert immutable.exit_code == 2
    assert "spec.baseModel" in immutable.output and "immutable" in immutable.output
    assert get_job(k8s, "support-assistant")["spec"]["baseModel"]["uri"].startswith("file://")


def test_submit_of_an_invalid_manifest_never_reaches_the_cluster(k8s):
    bad = REPO / "tests" / "manifests" / "invalid" / "02-negative-r.yaml"
    result = cli(k8s, "submit", "-f", str(bad))
    assert result.exit_code == 2
    assert "spec.lora.r" in result.output and "Traceback" not in result.output
    writes = [r for r in k8s.requests() if r.method.value in ("POST", "PUT", "PATCH")]
    assert writes == []


def test_status_table_shows_progress_governance_and_promotion(k8s):
    quickstart(k8s)
    set_status(k8s, "support-assistant", {
        "phase": "Training", "message": "training (attempt 1), 25% done",
        "progress": {"step": 10, "totalSteps": 40, "percent": 25, "loss": 1.234, "evalLoss": 1.5,
                     "tokensPerSecond": 900.0, "etaSeconds": 125}})
    result = cli(k8s, "status")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "support-assistant" in line)
    for cell in ("Training", "10/40", "25%", "1.234", "1.5", "2m05s"):
        assert cell in row
    one = cli(k8s, "status", "support-assistant")
    assert "training (attempt 1), 25% done" in one.output


def test_report_prints_the_governance_table(k8s):
    quickstart(k8s)
    set_status(k8s, "support-assistant", {
        "phase": "Failed", "adapter": {"uri": "s3://b/a", "digest": DIGEST, "sizeBytes": 1},
        "governance": {"checks": CHECKS, "passed": False, "adapterDigest": DIGEST,
                       "effectivePolicy": {"required": ["evaluation", "bias"]}, "runs": 2,
                       "policyDigest": "sha256:" + "2" * 64, "reportURI": "s3://b/a/governance/run-2.json",
                       "signingKey": "c" * 64,
                       "history": [{"run": 1, "policyDigest": "sha256:" + "1" * 64, "passed": False,
                                    "failing": ["pii"], "reportURI": "s3://b/a/governance/run-1.json"}]},
        "promotion": {"state": "Blocked", "reason": "GovernanceFailed"}})
    result = cli(k8s, "report", "support-assistant")
    assert result.exit_code == 0, result.output
    assert "BLOCKED" in result.output
    assert "largest gap 0.4 on gender" in result.output and "FAIL" in result.output
    assert "promotion: Blocked" in result.output and DIGEST in result.output
    assert "run 2 under policy sha256:222222222222; signed by platform key cccccccccccccccc" in result.output
    assert "run 1 under policy sha256:111111111111: failed (pii)  report: s3://b/a/governance/run-1.json" \
        in result.output


def test_report_before_governance_is_one_clear_line(k8s):
    quickstart(k8s)
    result = cli(k8s, "report", "support-assistant")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: FineTuneJob support-assistant has no governance report yet (phase Pending)"]


def test_approve_records_the_digest_and_the_kubeconfig_user(k8s):
    quickstart(k8s)
    set_status(k8s, "support-assistant", {"phase": "AwaitingApproval",
                                          "adapter": {"uri": "s3://b/a", "digest": DIGEST, "sizeBytes": 1}})
    wrong = cli(k8s, "approve", "support-assistant", "--digest", "sha256:" + "cd" * 32)
    assert wrong.exit_code == 1 and "is not the trained adapter" in wrong.output
    assert "approval" not in get_job(k8s, "support-assistant")["spec"]["promotion"]

    result = cli(k8s, "approve", "support-assistant", "--digest", DIGEST)
    assert result.exit_code == 0, result.output
    approval = get_job(k8s, "support-assistant")["spec"]["promotion"]["approval"]
    assert approval == {"digest": DIGEST, "approvedBy": "alice"}

    by = cli(k8s, "approve", "support-assistant", "--digest", DIGEST, "--by", "carol@example.org")
    assert by.exit_code == 0
    assert get_job(k8s, "support-assistant")["spec"]["promotion"]["approval"]["approvedBy"] == "carol@example.org"

    malformed = cli(k8s, "approve", "support-assistant", "--digest", "not-a-digest")
    assert malformed.exit_code == 2 and "spec.promotion.approval.digest" in malformed.output


def test_logs_of_the_trainer_pod(k8s):
    quickstart(k8s)
    set_status(k8s, "support-assistant", {"phase": "Training", "trainerJob": "support-assistant-train-1"})
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(k8s.kubeconfig)))
    for name, job in (("other-pod", "other-train-1"), ("support-assistant-train-1-x7k2p", "support-assistant-train-1")):
        core.create_namespaced_pod(NS, {"apiVersion": "v1", "kind": "Pod",
                                        "metadata": {"name": name, "labels": {"job-name": job}},
                                        "spec": {"containers": [{"name": "main", "image": "trainer"}]}})
    k8s.kmock[f"get /api/v1/namespaces/{NS}/pods/support-assistant-train-1-x7k2p/log"] << \
        b'{"msg": "step 1"}\n{"msg": "step 2"}\n'
    result = cli(k8s, "logs", "support-assistant")
    assert result.exit_code == 0, result.output
    assert result.output == '{"msg": "step 1"}\n{"msg": "step 2"}\n'
    follow = cli(k8s, "logs", "support-assistant", "-f")
    assert follow.exit_code == 0 and "step 2" in follow.output
    assert any(r.params.get("follow") == "true" for r in k8s.requests() if r.url.path.endswith("/log"))


def test_logs_before_the_trainer_exists(k8s):
    quickstart(k8s)
    result = cli(k8s, "logs", "support-assistant")
    assert result.exit_code == 1
    assert "has no trainer Job yet (phase Pending)" in result.output


def _operator_progress(k8s, final: dict) -> None:
    for step in (10, 20, 40):
        time.sleep(0.3)
        set_status(k8s, "support-assistant", {"phase": "Training", "progress": {
            "step": step, "totalSteps": 40, "percent": step * 100 // 40, "loss": 2.0 - step / 40}})
    time.sleep(0.3)
    set_status(k8s, "support-assistant", final)


@pytest.mark.parametrize("final, code", [
    ({"phase": "Succeeded", "message": "adapter promoted as support-assistant",
      "governance": {"checks": CHECKS[:1], "passed": True}, "promotion": {"state": "Promoted"}}, 0),
    ({"phase": "Failed", "message": "promotion blocked", "governance": {"checks": CHECKS, "passed": False},
      "promotion": {"state": "Blocked"}}, 3),
], ids=["promoted", "blocked"])
def test_watch_follows_status_until_the_job_finishes(k8s, final, code):
    quickstart(k8s)
    writer = threading.Thread(target=_operator_progress, args=(k8s, final))
    writer.start()
    result = cli(k8s, "watch", "support-assistant", "--interval", "0.1", "--timeout", "60")
    writer.join()
    assert result.exit_code == code, result.output
    assert "support-assistant: Training step 20/40" in result.output
    assert f"support-assistant: {final['phase']} {final['message']}" in result.output


def test_unknown_job_and_unreachable_cluster_are_one_line(k8s, tmp_path):
    missing = cli(k8s, "status", "nope")
    assert missing.exit_code == 1
    assert missing.output.strip() == f"error: FineTuneJob nope: not found in namespace {NS}"
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(k8s.kubeconfig.read_text().replace(k8s.url, "http://127.0.0.1:9"))
    result = CliRunner().invoke(app, ["--kubeconfig", str(dead), "status"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Kubernetes API" in lines[0]


def test_submit_a_cluster_scoped_governance_policy(k8s, tmp_path):
    policy = {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy", "metadata": {"name": "strict"},
              "spec": {"required": ["evaluation", "pii"], "namespaces": [NS]}}
    created = cli(k8s, "submit", "-f", str(write_manifests(tmp_path / "policy.yaml", policy)))
    assert created.exit_code == 0 and "governancepolicy.finetune.dev/strict created" in created.output
    stored = api(k8s).get_cluster_custom_object("finetune.dev", "v1alpha1", "governancepolicies", "strict")
    assert stored["spec"]["required"] == ["evaluation", "pii"] and "namespace" not in stored["metadata"]
    policy["spec"]["required"] = ["evaluation"]
    updated = cli(k8s, "submit", "-f", str(write_manifests(tmp_path / "policy.yaml", policy)))
    assert updated.exit_code == 0 and "strict configured" in updated.output
    stored = api(k8s).get_cluster_custom_object("finetune.dev", "v1alpha1", "governancepolicies", "strict")
    assert stored["spec"]["required"] == ["evaluation"]


def test_rollback_revokes_the_job_the_alias_points_at_and_report_shows_the_targets(k8s):
    quickstart(k8s)
    promoted = {"phase": "Succeeded", "adapter": {"uri": "s3://b/a", "digest": DIGEST, "sizeBytes": 1},
                "governance": {"checks": CHECKS, "passed": True, "adapterDigest": DIGEST},
                "promotion": {"state": "Promoted", "alias": "support", "promotedAt": "2026-01-02T00:00:00Z",
                              "served": {"uri": "s3://b/a", "digest": DIGEST},
                              "targets": [{"name": "vllm", "kind": "vllm", "state": "Retrying", "attempts": 2,
                                           "conditions": [{"type": "Published", "status": "False",
                                                           "reason": "PublishFailed",
                                                           "message": "ConfigMap cm exists without the label",
                                                           "lastTransitionTime": "2026-01-02T00:00:00Z"}]}]}}
    set_status(k8s, "support-assistant", promoted)
    report = cli(k8s, "report", "support-assistant")
    assert report.exit_code == 0 and "target vllm (vllm): Retrying" in report.output
    assert "ConfigMap cm exists without the label" in report.output

    missing = cli(k8s, "rollback", "nope")
    assert missing.exit_code == 1 and "no promoted FineTuneJob holds alias nope" in missing.output
    result = cli(k8s, "rollback", "support")
    assert result.exit_code == 0, result.output
    assert f"support-assistant revoked: alias support leaves {DIGEST}" in result.output
    assert get_job(k8s, "support-assistant")["spec"]["promotion"]["revoked"] is True
    wrong = cli(k8s, "rollback", "other-alias", "--job", "support-assistant")
    assert wrong.exit_code == 1 and "did not promote alias other-alias" in wrong.output
