"""The operator's decisions, without a cluster: observed state in, Plan out."""

from __future__ import annotations

from finetune_operator import decisions, governance
from finetune_operator.conditions import get_condition
from finetune_operator.config import OperatorConfig

CFG = OperatorConfig(artifact_store="s3://store", default_governance={"required": []})
NOW = "2026-01-01T00:10:00Z"
DIGEST = "sha256:" + "ab" * 32


def dataset(status=None, generation=1, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": "ds", "namespace": "ns", "uid": "d-uid", "generation": generation},
            "spec": {"source": {"uri": "s3://b/raw.jsonl"}, "format": "chat", "curation": {"minExamples": 5},
                     **spec},
            "status": status or {}}


def ready_dataset() -> dict:
    return dataset({"phase": "Ready", "observedGeneration": 1, "digest": "sha256:" + "1" * 64,
                    "validatedURI": "s3://store/datasets/ns/ds/1"})


def ftj(status=None, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "j-uid", "generation": 1},
            "spec": {"baseModel": {"uri": "s3://m/tiny"}, "datasetRef": {"name": "ds"},
                     "output": {"uri": "s3://out/j"}, "resources": {"gpusPerNode": 1}, **spec},
            "status": status or {}}


def job(name="j-train-1", **status) -> dict:
    conditions = []
    if status.pop("complete", False):
        conditions.append({"type": "Complete", "status": "True"})
    if "failed_reason" in status:
        conditions.append({"type": "Failed", "status": "True", "reason": status.pop("failed_reason"),
                           "message": "failed"})
    return decisions.summarize_job({"metadata": {"name": name}, "status": {**status, "conditions": conditions}})


def pod(phase="Running", **kw) -> dict:
    status: dict = {"phase": phase, "conditions": [], "containerStatuses": []}
    if "unschedulable" in kw:
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": kw["unschedulable"]})
    if "waiting" in kw:
        status["containerStatuses"].append({"state": {"waiting": {"reason": kw["waiting"], "message": "not found"}}})
    if "terminated" in kw:
        reason, code = kw["terminated"]
        status["containerStatuses"].append({"state": {"terminated": {"reason": reason, "exitCode": code}}})
    return decisions.summarize_pod({"metadata": {"name": "p"}, "status": status})


# --- Dataset ---------------------------------------------------------------------------------

def test_dataset_creates_validation_job_then_ready():
    plan = decisions.plan_dataset(dataset(), None, [], None, CFG, NOW)
    assert [m["kind"] for m in plan.create] == ["ConfigMap", "Job"]
    assert plan.status["phase"] == "Validating" and plan.events
    report = {"valid": True, "stats": {"examples": 9, "evalExamples": 1}, "digest": "sha256:" + "2" * 64,
              "piiFindings": {"email": 1}}
    done = decisions.plan_dataset(dataset(plan.status), job("ds-validate-1", complete=True, succeeded=1), [],
                                  report, CFG, NOW)
    assert done.status["phase"] == "Ready" and done.status["digest"] == report["digest"]
    assert done.status["stats"]["examples"] == 9 and done.status["piiFindings"] == {"email": 1}
    assert get_condition(done.status["conditions"], "Ready")["status"] == "True"
    assert not done.create
    # Nothing more to do for this generation; a new generation validates again.
    assert decisions.plan_dataset(dataset(done.status), None, [], None, CFG, NOW).status is None
    assert decisions.plan_dataset(dataset(done.status, generation=2), None, [], None, CFG, NOW).create


def test_dataset_invalid_carries_reason_and_lines_and_too_few_examples():
    report = {"valid": False, "reason": "MalformedLines", "message": "3 malformed lines",
              "stats": {"examples": 20}, "invalidLineNumbers": list(range(1, 40))}
    plan = decisions.plan_dataset(dataset(), job("ds-validate-1", failed_reason="PodFailurePolicy"), [],
                                  report, CFG, NOW)
    assert plan.status["phase"] == "Invalid" and len(plan.status["invalidLineNumbers"]) == 20
    assert "first offending lines: 1, 2" in plan.status["message"]
    few = {"valid": True, "stats": {"examples": 3}}
    plan = decisions.plan_dataset(dataset(), job("ds-validate-1", complete=True), [], few, CFG, NOW)
    assert plan.status["phase"] == "Invalid" and "3 valid examples" in plan.status["message"]


# --- Job observations ------------------------------------------------------------------------

def test_job_states():
    assert decisions.job_state(None, []).state == "Missing"
    assert decisions.job_state(job(active=1), [pod("Pending", unschedulable="0/3 nodes: Insufficient nvidia.com/gpu")]) \
        .message.endswith("Insufficient nvidia.com/gpu")
    assert decisions.job_state(job(active=1), [pod("Pending", waiting="ImagePullBackOff")]).state == "ImagePull"
    assert decisions.job_state(job(active=1), [pod()]).state == "Running"
    oom = decisions.job_state(job(failed=1), [pod("Failed", terminated=("OOMKilled", 137))])
    assert oom.oom and "qlora" in oom.message and "gradientCheckpointing" in oom.message
    cfg = decisions.job_state(job(failed=1, failed_reason="PodFailurePolicy"), [pod("Failed", terminated=("Error", 3))])
    assert cfg.reason == "ConfigurationError"
    assert decisions.job_state(job(complete=True), []).state == "Succeeded"


# --- FineTuneJob -----------------------------------------------------------------------------

def test_waits_for_dataset_then_creates_trainer_job_with_four_writes():
    waiting = decisions.plan_finetunejob(ftj(), decisions.JobInputs(dataset=dataset({"phase": "Validating"})), CFG, NOW)
    assert waiting.status["phase"] == "WaitingForDataset" and not waiting.create
    assert get_condition(waiting.status["conditions"], "DatasetReady")["reason"] == "DatasetValidating"
    missing = decisions.plan_finetunejob(ftj(), decisions.JobInputs(), CFG, NOW)
    assert get_condition(missing.status["conditions"], "DatasetReady")["reason"] == "DatasetNotFound"
    plan = decisions.plan_finetunejob(ftj(), decisions.JobInputs(dataset=ready_dataset()), CFG, NOW)
    # The write budget until Training: ConfigMap + Job + one status patch + one Event.
    assert [m["kind"] for m in plan.create] == ["ConfigMap", "Job"] and len(plan.events) == 1
    assert plan.status["phase"] == "Queued" and plan.status["trainerJob"] == "j-train-1"
    # Applying the same observation again (the Job not yet visible) changes nothing.
    again = decisions.plan_finetunejob(ftj(plan.status), decisions.JobInputs(dataset=ready_dataset(),
                                       trainer_job=job(active=0)), CFG, NOW)
    assert again.status is None and not again.create and not again.events


def queued() -> dict:
    return {"phase": "Queued", "trainerJob": "j-train-1", "observedGeneration": 1, "conditions": []}


def test_running_unschedulable_and_image_pull_statuses():
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(active=1),
                                 trainer_pods=[pod("Pending", unschedulable="0/2 nodes are available")])
    plan = decisions.plan_finetunejob(ftj(queued()), inputs, CFG, NOW)
    assert plan.status["phase"] == "Queued" and "0/2 nodes are available" in plan.status["message"]
    assert plan.events[0][0] == "Warning"
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(active=1),
                                 trainer_pods=[pod("Pending", waiting="ErrImagePull")])
    assert "cannot be pulled" in decisions.plan_finetunejob(ftj(queued()), inputs, CFG, NOW).status["message"]
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(active=1, startTime="2026-01-01T00:00:00Z"),
                                 trainer_pods=[pod()], progress={"step": 5, "totalSteps": 10, "percent": 50})
    plan = decisions.plan_finetunejob(ftj(queued()), inputs, CFG, NOW)
    assert plan.status["phase"] == "Training" and plan.status["progress"]["percent"] == 50
    assert plan.status["gpuHours"] == round(10 / 60, 4)  # 1 GPU for 10 minutes


def test_oom_fails_with_advice_and_stops_retries():
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(failed=1, active=0),
                                 trainer_pods=[pod("Failed", terminated=("OOMKilled", 137))])
    plan = decisions.plan_finetunejob(ftj(queued()), inputs, CFG, NOW)
    assert plan.status["phase"] == "Failed" and "qlora" in plan.status["message"]
    assert plan.suspend_jobs == ["j-train-1"]
    assert get_condition(plan.status["conditions"], "Failed")["reason"] == "OOMKilled"


def test_suspend_deletes_running_job_and_resume_creates_next_attempt():
    status = {**queued(), "phase": "Training", "startTime": "2026-01-01T00:00:00Z"}
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(active=1), trainer_pods=[pod()])
    plan = decisions.plan_finetunejob(ftj(status, suspend=True), inputs, CFG, NOW)
    assert plan.delete_jobs == ["j-train-1"] and plan.status["phase"] == "Suspended"
    resumed = decisions.plan_finetunejob(ftj(plan.status), decisions.JobInputs(dataset=ready_dataset()), CFG, NOW)
    assert resumed.status["trainerJob"] == "j-train-2" and resumed.status["phase"] == "Queued"
    assert get_condition(resumed.status["conditions"], "Suspended")["status"] == "False"


def signed_report(checks: list[dict]) -> dict:
    report = {"adapterDigest": DIGEST, "checks": checks, "policy": {"required": []}}
    return {**report, "sha256": governance.report_digest(report)}


def test_trained_evaluates_and_promotes_or_awaits_approval():
    status = {**queued(), "phase": "Training", "startTime": "2026-01-01T00:00:00Z"}
    result = {"adapterURI": "s3://out/j/adapters/ab", "digest": DIGEST, "sizeBytes": 10, "metrics": {"evalLoss": 1.5}}
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(complete=True), result=result)
    plan = decisions.plan_finetunejob(ftj(status), inputs, CFG, NOW)
    assert plan.status["phase"] == "Evaluating" and plan.status["adapter"]["digest"] == DIGEST
    gov_job = [m for m in plan.create if m["kind"] == "Job"][0]
    assert gov_job["spec"]["template"]["spec"]["containers"][0]["command"][1] == "governance"
    evaluating = plan.status
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job(gov_job["metadata"]["name"], complete=True),
                                 report=signed_report([]), manifest_ok=(True, "ok"))
    done = decisions.plan_finetunejob(ftj(evaluating), inputs, CFG, NOW)
    assert done.status["phase"] == "Succeeded" and done.status["promotion"]["state"] == "Promoted"
    assert done.alias[0] == "s3://out/j/aliases/j.json" and done.alias[1]["adapterDigest"] == DIGEST
    manual = decisions.plan_finetunejob(ftj(evaluating, promotion={"mode": "manual"}), inputs, CFG, NOW)
    assert manual.status["phase"] == "AwaitingApproval" and manual.alias is None
    approved = decisions.plan_finetunejob(
        ftj(manual.status, promotion={"mode": "manual", "approval": {"digest": DIGEST, "approvedBy": "ana"}}),
        inputs, CFG, NOW)
    assert approved.status["phase"] == "Succeeded" and approved.status["promotion"]["approvedBy"] == "ana"


def test_failed_required_check_blocks_promotion():
    evaluating = {**queued(), "phase": "Evaluating", "adapter": {"uri": "s3://out/j/adapters/ab", "digest": DIGEST}}
    cfg = OperatorConfig(default_governance={"required": ["evaluation"]})
    report = signed_report([{"name": "evaluation", "passed": False, "message": "worse than base"}])
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job("x", complete=True), report=report,
                                 manifest_ok=(True, "ok"))
    plan = decisions.plan_finetunejob(ftj(evaluating), inputs, cfg, NOW)
    assert plan.status["phase"] == "Failed" and plan.status["promotion"]["state"] == "Blocked"
    assert get_condition(plan.status["conditions"], "GovernancePassed")["status"] == "False"


def test_statuses_fit_the_api_schema():
    """What the operator writes must validate against the CRD's status schema (the pydantic models)."""
    from finetune_operator.api.dataset import DatasetStatus
    from finetune_operator.api.finetunejob import FineTuneJobStatus

    report = {"valid": True, "stats": {"examples": 9, "evalExamples": 1}, "digest": "sha256:" + "2" * 64,
              "piiFindings": {"email": 1}, "validatedURI": "s3://store/v"}
    ds = decisions.plan_dataset(dataset(), job("ds-validate-1", complete=True), [], report, CFG, NOW)
    DatasetStatus.model_validate(ds.status)
    evaluating = {**queued(), "phase": "Evaluating", "gpuHours": 0.5,
                  "adapter": {"uri": "s3://out/j/adapters/ab", "digest": DIGEST, "sizeBytes": 3},
                  "progress": {"step": 6, "totalSteps": 6, "percent": 100, "loss": 1.0}}
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job("x", complete=True),
                                 report=signed_report([{"name": "pii", "passed": True, "value": 0.0}]),
                                 manifest_ok=(True, "ok"))
    done = decisions.plan_finetunejob(ftj(evaluating), inputs, CFG, NOW)
    FineTuneJobStatus.model_validate(done.status)
    assert done.status["governance"]["checks"][0]["name"] == "pii"
