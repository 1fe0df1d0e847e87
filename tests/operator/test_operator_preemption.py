"""Kueue-style preemption end to end: the trainer Job (2 ranks under torchrun, gloo on CPU) is
suspended behind the operator's back, the ranks checkpoint on SIGTERM and the launcher exits 5, the
FineTuneJob shows Preempted (never Failed), and when the Job is readmitted the same attempt resumes
from the checkpoint and finishes with every step done once."""

from __future__ import annotations

import json
import os

from operator_e2e import finetunejob_manifest, phase, ready_dataset, running_operator, status_of
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import checkpoint

STEPS = 80


def set_job_suspend(cluster, name: str, value: bool) -> None:
    """What Kueue does: it owns .spec.suspend of a queued Job (preempt: true, admit: false)."""
    cluster.request("PATCH", f"/apis/batch/v1/namespaces/default/jobs/{name}", {"spec": {"suspend": value}},
                    content_type="application/merge-patch+json")


def test_kueue_preemption_checkpoints_shows_preempted_and_resumes(cluster, env, kubelet, model_uri, monkeypatch):
    # Slow steps, so the suspension lands mid-training; and the pods run the code under test (the
    # fake kubelet's pods otherwise import the package the virtualenv points at).
    job_env = {**json.loads(env["FINETUNE_JOB_ENV"]), "FINETUNE_DEBUG_STEP_SLEEP": "0.1"}
    if os.environ.get("PYTHONPATH"):
        job_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    monkeypatch.setenv("FINETUNE_JOB_ENV", json.dumps(job_env))
    ready_dataset(cluster, env["bucket"])
    output = f"s3://{env['bucket']}/runs/pre"
    manifest = finetunejob_manifest("pre", "ready", model_uri, output,
                                    training={"maxSteps": STEPS, "checkpointEverySteps": 1000})
    manifest["spec"]["resources"] = {"gpusPerNode": 2, "cpu": "2", "memory": "4Gi", "queueName": "team-queue"}
    cluster.create(manifest)
    with running_operator():
        wait_for(lambda: (status_of(cluster, "pre").get("progress") or {}).get("step"), 120, "progress")
        job = cluster.get("batch/v1", "jobs", "default", "pre-train-1")
        env_names = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env_names["PET_NPROC_PER_NODE"] == "2"
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"

        set_job_suspend(cluster, "pre-train-1", True)
        try:
            wait_for(lambda: any(p.startswith("pre-train-1") and code == 5 for p, code in kubelet.exit_codes.items()),
                     150, "the launcher exits 5 after its ranks checkpointed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; exit codes {kubelet.exit_codes}; log:\n{kubelet.log('pre-')[-6000:]}") from None
        assert '"world_size": 2' in kubelet.log("pre-train-1")  # torchrun started both ranks
        steps = checkpoint.list_steps(output)
        assert steps and 0 < steps[0] < STEPS  # written on SIGTERM, not on the (never reached) cadence
        preempted = wait_for(lambda: get_condition(status_of(cluster, "pre").get("conditions") or [], "Preempted"),
                             30, "Preempted condition")
        st = status_of(cluster, "pre")
        assert preempted["status"] == "True" and st["phase"] == "Queued" and "preempted" in st["message"]
        assert get_condition(st["conditions"], "Failed") is None

        set_job_suspend(cluster, "pre-train-1", False)  # readmitted
        done = wait_for(lambda: phase(cluster, "pre") in ("Evaluating", "Succeeded", "Failed")
                        and status_of(cluster, "pre"), 240, "trained")
    assert done["phase"] in ("Evaluating", "Succeeded"), (done, kubelet.log("pre-"))
    assert done["trainerJob"] == "pre-train-1"  # the same attempt, not a new Job
    assert "resumed from checkpoint" in kubelet.log("pre-train-1")
    assert get_condition(done["conditions"], "Preempted")["reason"] == "Readmitted"
    assert done["progress"]["totalSteps"] == STEPS and done["progress"]["percent"] == 100
