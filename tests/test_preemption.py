"""Preemption is a pause: a trainer Job suspended by Kueue (not by spec.suspend) shows Preempted,
not Failed; GPU-hours stop when its pods stopped; readmission continues the same attempt."""

from __future__ import annotations

from finetune_operator import decisions
from finetune_operator.conditions import get_condition
from finetune_operator.config import OperatorConfig

CFG = OperatorConfig(artifact_store="s3://store", default_governance={"required": []})
T0, T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-01-01T00:30:00Z", "2026-01-01T01:30:00Z", "2026-01-01T02:00:00Z"
DATASET = {"metadata": {"name": "ds", "generation": 1}, "spec": {"format": "chat"},
           "status": {"phase": "Ready", "observedGeneration": 1, "validatedURI": "s3://v", "digest": "sha256:1"}}


def ftj(status: dict) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {"baseModel": {"uri": "s3://m"}, "datasetRef": {"name": "ds"}, "output": {"uri": "s3://o"},
                     "resources": {"gpusPerNode": 4, "nodes": 2, "queueName": "q"}},
            "status": status}


def job(suspended=False, start=T0, **status) -> dict:
    conditions = [{"type": "Suspended", "status": "True", "lastTransitionTime": T1}] if suspended else []
    return decisions.summarize_job({"metadata": {"name": "j-train-1"},
                                    "spec": {"suspend": suspended, "parallelism": 2},
                                    "status": {"startTime": start, "conditions": conditions, **status}})


def running_pod() -> dict:
    return decisions.summarize_pod({"metadata": {"name": "p"}, "status": {"phase": "Running"}})


def plan(status: dict, trainer_job: dict, pods: list, now: str) -> decisions.Plan:
    return decisions.plan_finetunejob(ftj(status), decisions.JobInputs(
        dataset=DATASET, trainer_job=trainer_job, trainer_pods=pods, progress={"step": 40, "totalSteps": 100}), CFG, now)


def test_a_kueue_suspended_job_is_preempted_then_readmitted():
    training = plan({"phase": "Queued", "trainerJob": "j-train-1", "observedGeneration": 1, "conditions": []},
                    job(active=2, ready=2), [running_pod(), running_pod()], T1).status
    assert training["phase"] == "Training" and training["startTime"] == T0

    # Kueue suspends the Job at T1; the operator sees it an hour later: hours stop at T1 (2 pods x 4 GPUs x 0.5 h)
    p = plan(training, job(suspended=True, active=0), [], T2)
    st = p.status
    assert st["phase"] == "Queued" and st["phase"] != "Failed"
    pre = get_condition(st["conditions"], "Preempted")
    assert pre["status"] == "True" and pre["reason"] == "JobSuspended" and "step 40" in pre["message"]
    assert get_condition(st["conditions"], "Failed") is None
    assert st["gpuHours"] == 4.0
    # the hours so far go on the Job (its startTime restarts on readmission); nothing else is touched
    assert p.job_patches == {"j-train-1": {"metadata": {"annotations": {decisions.GPU_HOURS_BEFORE: "4.0"}}}}
    assert not p.delete_jobs and not p.create and not p.suspend_jobs
    assert ("Normal", "Preempted") == p.events[0][:2]
    ready = get_condition(decisions.kstatus.conditions_for("FineTuneJob", st, 1, T2), "Reconciling")
    assert ready["status"] == "True"  # kstatus: InProgress (it resumes by itself), never Failed

    # The same observation again patches nothing more.
    again = plan(st, job(suspended=True, active=0), [], T3)
    assert again.job_patches == {} and (again.status is None or again.status["gpuHours"] == 4.0)

    # Readmitted: the Job controller restarted startTime at T2 and the annotation holds the 4 hours before.
    resumed_job = decisions.summarize_job({"metadata": {"name": "j-train-1", "annotations": {
        decisions.GPU_HOURS_BEFORE: "4.0"}}, "spec": {"parallelism": 2},
        "status": {"startTime": T2, "active": 2, "ready": 2}})
    back = plan(st, resumed_job, [running_pod(), running_pod()], T3).status
    assert back["phase"] == "Training" and back["trainerJob"] == "j-train-1"  # the same attempt
    assert get_condition(back["conditions"], "Preempted")["status"] == "False"
    assert get_condition(back["conditions"], "Preempted")["reason"] == "Readmitted"
    assert back["gpuHours"] == 8.0  # 4 before + 2 pods x 4 GPUs x 0.5 h since readmission


def test_a_job_kueue_has_not_admitted_yet_is_just_queued():
    st = plan({"phase": "Queued", "trainerJob": "j-train-1", "observedGeneration": 1, "conditions": []},
              job(suspended=True, start=None, active=0), [], T1).status
    assert st["phase"] == "Queued" and get_condition(st["conditions"], "Preempted") is None
