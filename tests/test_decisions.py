"""The operator's decisions, without a cluster: observed state in, Plan out."""

from __future__ import annotations

from finetune_operator import decisions, governance
from finetune_operator.conditions import get_condition
from finetune_operator.config import OperatorConfig
from testutil import sign_report, make_keyring

CFG = OperatorConfig(artifact_store="s3://store", default_governance={"required": []})
NOW = "2026-01-01T00:10:00Z"
DIGEST = "sha256:" + "ab" * 32
KEYS = make_keyring()


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


def test_suspend_suspends_the_job_in_place_and_resume_unsuspends_it():
    status = {**queued(), "phase": "Training", "startTime": "2026-01-01T00:00:00Z"}
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(active=1, startTime="2026-01-01T00:00:00Z"),
                                 trainer_pods=[pod()])
    plan = decisions.plan_finetunejob(ftj(status, suspend=True), inputs, CFG, NOW)
    assert plan.status["phase"] == "Suspended" and not plan.delete_jobs
    patch = plan.job_patches["j-train-1"]
    assert patch["spec"] == {"suspend": True}
    # The Job controller restarts startTime on resume: the GPU-hours so far (10 min x 1 GPU) go on the Job.
    assert patch["metadata"]["annotations"][decisions.GPU_HOURS_BEFORE] == str(plan.status["gpuHours"]) == "0.1667"
    assert get_condition(plan.status["conditions"], "Suspended")["status"] == "True"
    # Once the Job shows it is suspended, nothing more is patched and the hours stay frozen.
    suspended = job(active=0, startTime="2026-01-01T00:00:00Z")
    suspended["suspended"] = True
    later = decisions.plan_finetunejob(ftj(plan.status, suspend=True),
                                       decisions.JobInputs(dataset=ready_dataset(), trainer_job=suspended),
                                       CFG, "2026-01-01T05:00:00Z")
    assert later.status is None and not later.job_patches

    resumed = decisions.plan_finetunejob(ftj(plan.status), decisions.JobInputs(dataset=ready_dataset(),
                                                                               trainer_job=suspended), CFG, NOW)
    assert resumed.job_patches == {"j-train-1": {"spec": {"suspend": False}}}
    assert resumed.status["trainerJob"] == "j-train-1" and resumed.status["phase"] == "Queued" and not resumed.create
    assert get_condition(resumed.status["conditions"], "Suspended")["status"] == "False"
    assert ("Normal", "Resumed", resumed.status["message"]) in resumed.events


def test_suspend_of_a_kueue_job_deletes_it_and_resume_creates_next_attempt():
    status = {**queued(), "phase": "Training", "startTime": "2026-01-01T00:00:00Z"}
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(active=1), trainer_pods=[pod()])
    spec = {"resources": {"gpusPerNode": 1, "queueName": "team-a"}}
    plan = decisions.plan_finetunejob(ftj(status, suspend=True, **spec), inputs, CFG, NOW)
    assert plan.delete_jobs == ["j-train-1"] and plan.status["phase"] == "Suspended" and not plan.job_patches
    resumed = decisions.plan_finetunejob(ftj(plan.status, **spec), decisions.JobInputs(dataset=ready_dataset()),
                                         CFG, NOW)
    assert resumed.status["trainerJob"] == "j-train-2" and resumed.status["phase"] == "Queued"
    assert get_condition(resumed.status["conditions"], "Suspended")["status"] == "False"


def test_resume_of_a_job_that_finished_before_the_suspension_took_hold_is_judged():
    status = {**queued(), "phase": "Suspended", "startTime": "2026-01-01T00:00:00Z"}
    result = {"adapterURI": "s3://out/j/adapters/ab", "digest": DIGEST, "sizeBytes": 10}
    plan = decisions.plan_finetunejob(ftj(status), decisions.JobInputs(
        dataset=ready_dataset(), trainer_job=job(complete=True), result=result), CFG, NOW)
    assert plan.status["phase"] == "Evaluating" and plan.status["adapter"]["digest"] == DIGEST
    assert not plan.job_patches


def test_unschedulable_pod_is_reported_with_the_schedulers_reason_not_as_running():
    message = ("0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node "
               "affinity/selector. preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling.")
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(active=1),
                                 trainer_pods=[pod("Pending", unschedulable=message)])
    plan = decisions.plan_finetunejob(ftj(queued()), inputs, CFG, NOW)
    assert plan.status["phase"] == "Queued" and message in plan.status["message"]
    trained = get_condition(plan.status["conditions"], "Trained")
    assert trained["reason"] == "Unschedulable" and message in trained["message"] and trained["observedGeneration"] == 1
    assert ("Warning", "Unschedulable", plan.status["message"]) in plan.events
    # A pod held back by a scheduling gate (Kueue) is waiting, not unschedulable.
    gated = decisions.summarize_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
         "message": "Scheduling is blocked due to non-empty scheduling gates"}]}})
    assert gated["unschedulable"] is None
    state = decisions.job_state(job(active=1), [gated])
    assert state.state == "Pending" and "SchedulingGated" in state.message


PRIORITY_MESSAGE = 'pods "j-train-1-" is forbidden: no PriorityClass with name no-such-class was found'


def test_permanent_and_transient_api_errors():
    assert decisions.permanent_api_error(422, 'Job.batch "j" is invalid: spec.template.spec.affinity...')
    assert decisions.permanent_api_error(400, "bad request")
    assert decisions.permanent_api_error(403, PRIORITY_MESSAGE)
    assert decisions.permanent_api_error(403, 'pods "x" is forbidden: violates PodSecurity "restricted:latest"')
    for status, message in ((409, "conflict"), (429, "too many requests"), (500, "etcd"), (503, "unavailable"),
                            (404, "not found"), (401, "Unauthorized"),
                            (403, 'pods "x" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=8'),
                            (403, 'jobs.batch is forbidden: User "system:serviceaccount:op:op" cannot create '
                                  'resource "jobs" in API group "batch" in the namespace "ns"')):
        assert not decisions.permanent_api_error(status, message), (status, message)


def test_rejected_child_fails_once_with_the_servers_message_and_a_new_generation_retries():
    plan = decisions.plan_rejected(ftj(), "Job j-train-1 (its pod template)", PRIORITY_MESSAGE, NOW)
    st = plan.status
    assert st["phase"] == "Failed" and PRIORITY_MESSAGE in st["message"]
    assert "spec.resources.priorityClassName" in st["message"]
    failed = get_condition(st["conditions"], "Failed")
    assert failed["reason"] == decisions.REJECTED and failed["observedGeneration"] == 1
    assert plan.events == [("Warning", decisions.REJECTED, st["message"])]
    # The same rejection again changes nothing and posts nothing.
    again = decisions.plan_rejected(ftj(st), "Job j-train-1 (its pod template)", PRIORITY_MESSAGE, NOW)
    assert again.status is None and not again.events
    # The same generation is final...
    stay = decisions.plan_finetunejob(ftj(st), decisions.JobInputs(dataset=ready_dataset()), CFG, NOW)
    assert stay.status is None and not stay.create
    # ...a new one (the spec was fixed) tries again: a trainer Job is planned.
    fixed = ftj(st)
    fixed["metadata"]["generation"] = 2
    retry = decisions.plan_finetunejob(fixed, decisions.JobInputs(dataset=ready_dataset()), CFG, NOW)
    assert retry.status["phase"] == "Queued" and [m["kind"] for m in retry.create] == ["ConfigMap", "Job"]
    assert get_condition(retry.status["conditions"], "Failed")["status"] == "False"
    assert "completionTime" not in retry.status
    # An ordinary failure (the trainer failed) is not retried by a spec change.
    trainer_failed = ftj({**st, "conditions": decisions.set_condition([], "Failed", True, "BackoffLimitExceeded",
                                                                      "x", 1, NOW)})
    trainer_failed["metadata"]["generation"] = 2
    assert not decisions.plan_finetunejob(trainer_failed, decisions.JobInputs(dataset=ready_dataset()), CFG,
                                          NOW).create


def test_rejected_field_hints():
    assert decisions.rejected_fields("spec.template.spec.affinity.nodeAffinity...operator: Unsupported value") == [
        "spec.resources.affinity"]
    assert decisions.rejected_fields("nothing we know") == []


def signed_report(checks: list[dict], cfg: OperatorConfig = CFG) -> dict:
    """Run 1's report under the configuration's default policy, as the governance command signs it."""
    policy, _ = decisions.effective_policy(ftj({}), [], cfg)
    report = {"adapterDigest": DIGEST, "checks": checks, "policy": policy, "run": 1,
              "policyDigest": governance.policy_digest(policy), "job": {"uid": "j-uid"}}
    return sign_report(report, KEYS)


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
                                 keys=KEYS, report=signed_report([]), manifest_ok=(True, "ok"))
    done = decisions.plan_finetunejob(ftj(evaluating), inputs, CFG, NOW)
    assert done.status["phase"] == "Succeeded" and done.status["promotion"]["state"] == "Promoted"
    assert done.alias[0] == "s3://out/j/aliases/j.json" and done.alias[1]["adapterDigest"] == DIGEST
    manual = decisions.plan_finetunejob(ftj(evaluating, promotion={"mode": "manual"}), inputs, CFG, NOW)
    assert manual.status["phase"] == "AwaitingApproval" and manual.alias is None
    approving = ftj(manual.status, promotion={"mode": "manual", "approval": {"digest": DIGEST, "approvedBy": "ana"}})
    # What the API server shows about who wrote the approval: the field manager, in managedFields.
    approving["metadata"]["managedFields"] = [
        {"manager": "argocd-controller", "operation": "Apply", "time": "2026-01-01T00:01:00Z",
         "fieldsV1": {"f:spec": {"f:promotion": {"f:mode": {}}}}},
        {"manager": "kubectl-edit", "operation": "Update", "time": "2026-01-01T00:09:00Z",
         "fieldsV1": {"f:spec": {"f:promotion": {"f:approval": {"f:digest": {}, "f:approvedBy": {}}}}}},
        {"manager": "finetune-operator", "operation": "Update", "subresource": "status",
         "time": "2026-01-01T00:09:30Z", "fieldsV1": {"f:status": {"f:phase": {}}}}]
    approved = decisions.plan_finetunejob(approving, inputs, CFG, NOW)
    promotion = approved.status["promotion"]
    assert approved.status["phase"] == "Succeeded" and promotion["approvedBy"] == "ana"
    assert promotion["approvalManager"] == "kubectl-edit" and promotion["approvedAt"] == "2026-01-01T00:09:00Z"


def test_failed_required_check_blocks_promotion():
    evaluating = {**queued(), "phase": "Evaluating", "adapter": {"uri": "s3://out/j/adapters/ab", "digest": DIGEST}}
    cfg = OperatorConfig(default_governance={"required": ["evaluation"]})
    report = signed_report([{"name": "evaluation", "passed": False, "message": "worse than base"}], cfg)
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job("x", complete=True), keys=KEYS, report=report,
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
                                 keys=KEYS, report=signed_report([{"name": "pii", "passed": True, "value": 0.0}]),
                                 manifest_ok=(True, "ok"))
    done = decisions.plan_finetunejob(ftj(evaluating), inputs, CFG, NOW)
    FineTuneJobStatus.model_validate(done.status)
    assert done.status["governance"]["checks"][0]["name"] == "pii"


# --- governance re-runs after a policy change ------------------------------------------------

STRICT = {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy", "metadata": {"name": "strict"},
          "spec": {"required": ["evaluation"]}}
LOOSE = {**STRICT, "spec": {"required": []}}


def report_for(run: decisions.GovernanceRun, checks: list[dict]) -> dict:
    report = {"adapterDigest": DIGEST, "checks": checks, "policy": run.policy, "run": run.number,
              "policyDigest": run.policy_digest, "job": {"namespace": "ns", "name": "j", "uid": "j-uid"}}
    return sign_report(report, KEYS)


def evaluated(policies: list[dict], checks: list[dict], **spec) -> tuple[decisions.Plan, decisions.GovernanceRun]:
    """A trained job whose first governance run finished under `policies`."""
    training = {**queued(), "phase": "Training", "startTime": "2026-01-01T00:00:00Z"}
    result = {"adapterURI": "s3://out/j/adapters/ab", "digest": DIGEST, "sizeBytes": 10}
    inputs = decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(complete=True), result=result,
                                 policies=policies)
    started = decisions.plan_finetunejob(ftj(training, **spec), inputs, CFG, NOW)
    run = decisions.governance_run(ftj(started.status, **spec), started.status["governance"],
                                   "s3://out/j/adapters/ab", DIGEST, policies, CFG)
    assert not run.new and run.number == 1 and started.status["governanceJob"] == run.job_name
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job(run.job_name, complete=True),
                                 keys=KEYS, report=report_for(run, checks), manifest_ok=(True, "ok"), policies=policies)
    return decisions.plan_finetunejob(ftj(started.status, **spec), inputs, CFG, NOW), run


def test_failed_governance_runs_again_when_the_policy_changes():
    failing = [{"name": "evaluation", "passed": False, "message": "worse than base"}]
    blocked, run1 = evaluated([STRICT], failing)
    assert blocked.status["phase"] == "Failed" and blocked.status["governance"]["policyDigest"] == run1.policy_digest
    assert blocked.status["governance"]["reportURI"] == "s3://out/j/adapters/ab/governance/run-1.json"
    # Nothing changed: a finished job stays finished, and no rerun is due.
    assert not decisions.governance_rerun_due(ftj(blocked.status), [STRICT], CFG)
    assert decisions.plan_finetunejob(ftj(blocked.status), decisions.JobInputs(policies=[STRICT]), CFG, NOW).status is None

    # The platform team loosens the policy: a second run, with its own Job and report, is recorded.
    assert decisions.governance_rerun_due(ftj(blocked.status), [LOOSE], CFG)
    inputs = decisions.JobInputs(dataset=ready_dataset(), policies=[LOOSE])
    rerun = decisions.plan_finetunejob(ftj(blocked.status), inputs, CFG, NOW)
    status = rerun.status
    gov = status["governance"]
    assert status["phase"] == "Evaluating" and "completionTime" not in status
    assert gov["runs"] == 2 and gov["policyDigest"] != run1.policy_digest and "checks" not in gov
    assert gov["history"] == [{"run": 1, "policyDigest": run1.policy_digest, "passed": False, "failing": ["evaluation"],
                               "reportURI": "s3://out/j/adapters/ab/governance/run-1.json",
                               "reportDigest": blocked.status["governance"]["reportDigest"],
                               "evaluatedAt": NOW}]
    assert [e[1] for e in rerun.events] == ["GovernanceRerun"]
    assert get_condition(status["conditions"], "Failed")["status"] == "False"
    assert get_condition(status["conditions"], "GovernancePassed")["status"] == "Unknown"
    gov_job = [m for m in rerun.create if m["kind"] == "Job"][0]
    assert gov_job["metadata"]["name"] == status["governanceJob"] != run1.job_name
    rendered = gov_job["spec"]["template"]["metadata"]["annotations"]["finetune.dev/config"]
    assert '"run": 2' in rendered and "governance/run-2.json" in rendered

    # The same reconcile again (e.g. after a crash before the status patch): same run, same Job name.
    again = decisions.governance_run(ftj(blocked.status), blocked.status["governance"], "s3://out/j/adapters/ab",
                                     DIGEST, [LOOSE], CFG)
    assert (again.number, again.job_name) == (2, gov_job["metadata"]["name"])

    # Run 2 reports under the new policy: promoted, and the first run stays in the history.
    run2 = decisions.governance_run(ftj(status), gov, "s3://out/j/adapters/ab", DIGEST, [LOOSE], CFG)
    assert not run2.new and run2.job_name == gov_job["metadata"]["name"]
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job(run2.job_name, complete=True),
                                 keys=KEYS, report=report_for(run2, []), manifest_ok=(True, "ok"), policies=[LOOSE])
    done = decisions.plan_finetunejob(ftj(status), inputs, CFG, NOW)
    assert done.status["phase"] == "Succeeded" and done.status["promotion"]["state"] == "Promoted"
    assert done.status["governance"]["runs"] == 2 and len(done.status["governance"]["history"]) == 1
    from finetune_operator.api.finetunejob import FineTuneJobStatus
    FineTuneJobStatus.model_validate(done.status)
    # A promoted adapter is not re-judged by a later policy change.
    assert not decisions.governance_rerun_due(ftj(done.status), [STRICT], CFG)
    assert decisions.plan_finetunejob(ftj(done.status), decisions.JobInputs(policies=[STRICT]), CFG, NOW).status is None


def test_a_report_of_another_run_or_policy_is_not_evidence():
    blocked, run1 = evaluated([STRICT], [{"name": "evaluation", "passed": True}])
    assert blocked.status["phase"] == "Succeeded"
    rerun = decisions.plan_finetunejob(ftj({**blocked.status, "phase": "Evaluating"}),
                                       decisions.JobInputs(dataset=ready_dataset(), policies=[LOOSE]), CFG, NOW)
    run2 = decisions.governance_run(ftj(rerun.status), rerun.status["governance"], "s3://out/j/adapters/ab", DIGEST,
                                    [LOOSE], CFG)
    old_report = report_for(run1, [{"name": "evaluation", "passed": True}])
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job(run2.job_name, complete=True),
                                 keys=KEYS, report=old_report, manifest_ok=(True, "ok"), policies=[LOOSE])
    plan = decisions.plan_finetunejob(ftj(rerun.status), inputs, CFG, NOW)
    assert plan.status["phase"] == "Failed" and plan.status["promotion"]["state"] == "Blocked"
    message = get_condition(plan.status["conditions"], "GovernancePassed")["message"]
    assert "another policy" in message and "governance run 1, not run 2" in message


def test_policy_change_while_checks_run_replaces_the_running_job():
    training = {**queued(), "phase": "Training", "startTime": "2026-01-01T00:00:00Z"}
    result = {"adapterURI": "s3://out/j/adapters/ab", "digest": DIGEST, "sizeBytes": 10}
    started = decisions.plan_finetunejob(
        ftj(training), decisions.JobInputs(dataset=ready_dataset(), trainer_job=job(complete=True), result=result,
                                           policies=[STRICT]), CFG, NOW)
    first_job = started.status["governanceJob"]
    # The policy changes while the first run's Job runs; the handler looks for the new run's Job: none yet.
    running = decisions.JobInputs(dataset=ready_dataset(), policies=[LOOSE])
    plan = decisions.plan_finetunejob(ftj(started.status), running, CFG, NOW)
    assert plan.delete_governance_jobs == [first_job] and plan.status["governance"]["runs"] == 2
    assert [e[1] for e in plan.events] == ["GovernanceRerun"]  # phase stays Evaluating: one explicit Event
    assert plan.status["phase"] == "Evaluating" and plan.status["governanceJob"] != first_job


def test_manual_approval_survives_a_rerun_only_for_the_same_digest():
    manual = {"mode": "manual", "approval": {"digest": DIGEST, "approvedBy": "ana"}}
    waiting, _ = evaluated([LOOSE], [], promotion={"mode": "manual"})
    assert waiting.status["phase"] == "AwaitingApproval"
    rerun = decisions.plan_finetunejob(ftj(waiting.status, promotion={"mode": "manual"}),
                                       decisions.JobInputs(dataset=ready_dataset(), policies=[STRICT]), CFG, NOW)
    assert rerun.status["phase"] == "Evaluating" and rerun.status["promotion"]["state"] == "Pending"
    run2 = decisions.governance_run(ftj(rerun.status), rerun.status["governance"], "s3://out/j/adapters/ab", DIGEST,
                                    [STRICT], CFG)
    failed = report_for(run2, [{"name": "evaluation", "passed": False, "message": "worse"}])
    inputs = decisions.JobInputs(dataset=ready_dataset(), governance_job=job(run2.job_name, complete=True),
                                 keys=KEYS, report=failed, manifest_ok=(True, "ok"), policies=[STRICT])
    plan = decisions.plan_finetunejob(ftj(rerun.status, promotion=manual), inputs, CFG, NOW)
    assert plan.status["phase"] == "Failed" and plan.status["promotion"]["state"] == "Blocked" and plan.alias is None


def test_namespace_patterns_need_kopfs_namespace_scan():
    # With Kopf's scanning off (our default: no cluster-wide CRD discovery), a glob serves nothing.
    from finetune_operator.config import has_namespace_patterns, load

    assert has_namespace_patterns(("team-*",)) and has_namespace_patterns(("a", "!kube-system"))
    assert not has_namespace_patterns(("team-a", "team-b")) and not has_namespace_patterns(())
    assert load({"FINETUNE_NAMESPACES": "ftop-ab12-*"}).namespaces == ("ftop-ab12-*",)


def test_rejected_validation_job_fails_the_dataset_generation_and_the_next_one_validates():
    plan = decisions.plan_rejected(dataset(), "Job ds-validate-1 (its pod template)",
                                   'pods "ds-validate-1-" is forbidden: violates PodSecurity "restricted:latest"', NOW)
    st = plan.status
    assert st["phase"] == "Failed" and "PodSecurity" in st["message"]
    ready = get_condition(st["conditions"], "Ready")
    assert ready["status"] == "False" and ready["reason"] == decisions.REJECTED
    assert decisions.plan_dataset(dataset(st), None, [], None, CFG, NOW).status is None
    nxt = decisions.plan_dataset(dataset(st, generation=2), None, [], None, CFG, NOW)
    assert nxt.status["phase"] == "Validating" and [m["kind"] for m in nxt.create] == ["ConfigMap", "Job"]


def test_rbac_denial_is_told_apart_from_an_admission_refusal():
    assert decisions.rbac_denied('pods is forbidden: User "system:serviceaccount:op:op" cannot create resource '
                                 '"pods" in API group "" in the namespace "ns"')
    assert not decisions.rbac_denied(PRIORITY_MESSAGE)


# --- bounded messages ------------------------------------------------------------------------

HUGE = "x" * (4 << 20)  # a 4 MB message: a validator quoting a 4 MB line, a pod's termination message


def huge_invalid_report() -> dict:
    return {"valid": False, "reason": "Malformed" + "Y" * 5000, "message": HUGE, "stats": {"examples": 0},
            "invalidLineNumbers": [1]}


def test_bounded_is_short_says_how_long_and_is_idempotent():
    from finetune_operator.conditions import MESSAGE_LIMIT, bounded

    cut = bounded(HUGE)
    assert len(cut) <= MESSAGE_LIMIT and cut.endswith(f"{len(HUGE)} characters in all")
    assert bounded(cut) == cut and bounded("short") == "short"


def test_a_4mb_message_leaves_a_small_status_and_event_and_a_stable_plan():
    import json

    plan = decisions.plan_dataset(dataset(), job("ds-validate-1", failed_reason="PodFailurePolicy"), [],
                                  huge_invalid_report(), CFG, NOW)
    assert plan.status["phase"] == "Invalid"
    assert len(json.dumps(plan.status)) < 8192, "the status patch must stay far below the API server's limit"
    assert all(len(message) <= 1024 for _, _, message in plan.events)
    # The next reconcile sees its own (bounded) status and has nothing new to say.
    again = decisions.plan_dataset(dataset(plan.status), job("ds-validate-1", failed_reason="PodFailurePolicy"),
                                   [], huge_invalid_report(), CFG, NOW)
    assert again.status is None or (again.status == plan.status and not again.events)


def test_a_4mb_job_failure_message_is_bounded_in_the_finetunejob_status():
    import json

    state = decisions.job_state(decisions.summarize_job(
        {"metadata": {"name": "j-train-1"},
         "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                    "message": HUGE}]}}), [])
    assert state.state == "Failed" and len(state.message) <= 1024
    assert len(json.dumps(decisions.plan_rejected(ftj(), "Job j-train-1", HUGE, NOW).status)) < 8192
