"""How the operator reports what goes wrong: invalid data, configuration errors, OOM, scheduling, images.

Trainer Jobs here run stand-in commands (or none: the fake kubelet OOM-kills or cannot schedule
them) because what is tested is the operator's reading of Job and pod states, not training.
"""

from __future__ import annotations

import sys

from operator_e2e import dataset_manifest, finetunejob_manifest, phase, ready_dataset, status_of, write_raw_dataset
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition


def test_invalid_and_too_small_datasets(cluster, env, kubelet, operator):
    bad = write_raw_dataset(env["bucket"], n=30, key="raw/bad.jsonl", extra_lines=("not json", '{"messages": 1}'))
    small = write_raw_dataset(env["bucket"], n=4, key="raw/small.jsonl")
    cluster.create(dataset_manifest("bad", bad))
    cluster.create(dataset_manifest("small", small, min_examples=10))
    cluster.create(finetunejob_manifest("waits", "bad", "s3://x/model", f"s3://{env['bucket']}/runs/waits"))

    bad_ds = wait_for(lambda: phase(cluster, "bad", "datasets") == "Invalid" and cluster.dataset("bad"), 60)
    assert bad_ds["status"]["invalidLineNumbers"][:2] == [31, 32], bad_ds["status"]
    assert get_condition(bad_ds["status"]["conditions"], "Ready")["status"] == "False"
    assert "digest" not in bad_ds["status"]
    small_ds = wait_for(lambda: phase(cluster, "small", "datasets") == "Invalid" and cluster.dataset("small"), 60)
    has = small_ds["status"]["stats"]["examples"]
    assert has < 10 and str(has) in small_ds["status"]["message"] and "10" in small_ds["status"]["message"]

    waiting = wait_for(lambda: (get_condition(status_of(cluster, "waits").get("conditions"), "DatasetReady") or {})
                       .get("reason") == "DatasetInvalid" and status_of(cluster, "waits"), 20)
    assert waiting["phase"] == "WaitingForDataset" and "Invalid" in waiting["message"]
    assert cluster.get("batch/v1", "jobs", "default", "waits-train-1") is None


def test_trainer_failures_and_waiting_reasons(cluster, env, kubelet, operator):
    ready_dataset(cluster, env["bucket"])
    kubelet.declare("cfg-", command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    kubelet.declare("oom-", oom=True)
    scheduler_says = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    kubelet.declare("gpu-", unschedulable=scheduler_says)
    kubelet.declare("pull-", image_pull=True)
    out = f"s3://{env['bucket']}/runs"
    cluster.create(finetunejob_manifest("cfg", "ready", "s3://x/model", f"{out}/cfg", backoffLimit=3))
    cluster.create(finetunejob_manifest("oom", "ready", "s3://x/model", f"{out}/oom", backoffLimit=3))
    cluster.create(finetunejob_manifest("gpu", "ready", "s3://x/model", f"{out}/gpu",
                                        resources={"gpusPerNode": 1, "queueName": "team-a"}))
    cluster.create(finetunejob_manifest("pull", "ready", "s3://x/model", f"{out}/pull", image="nowhere/trainer:0"))

    # Exit code 3 fails the Job at once (podFailurePolicy), with no retries.
    cfg = wait_for(lambda: phase(cluster, "cfg") == "Failed" and status_of(cluster, "cfg"), 40)
    assert get_condition(cfg["conditions"], "Failed")["reason"] == "ConfigurationError", cfg
    assert kubelet.started_jobs.count("cfg-train-1") == 1
    assert len([p for p in kubelet.exit_codes if p.startswith("cfg-")]) == 1

    # OOM: failed with advice, and the Job is stopped so it does not retry into the same wall.
    oom = wait_for(lambda: phase(cluster, "oom") == "Failed" and status_of(cluster, "oom"), 40)
    assert "qlora" in oom["message"] and "batchSize" in oom["message"] and "gradientCheckpointing" in oom["message"]
    wait_for(lambda: cluster.get("batch/v1", "jobs", "default", "oom-train-1")["spec"].get("suspend"), 10)

    # Unschedulable: the scheduler's reason shows while the job waits (and the Kueue label is set).
    gpu = wait_for(lambda: scheduler_says in status_of(cluster, "gpu").get("message", "") and status_of(cluster, "gpu"), 30)
    assert gpu["phase"] == "Queued"
    assert get_condition(gpu["conditions"], "Trained")["reason"] == "Unschedulable"
    job = cluster.get("batch/v1", "jobs", "default", "gpu-train-1")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    pull = wait_for(lambda: "cannot be pulled" in status_of(cluster, "pull").get("message", "")
                    and status_of(cluster, "pull"), 30)
    assert "ErrImagePull" in pull["message"] and "nowhere/trainer:0" in pull["message"]
    # Kopf posts Events from a queue, a moment after the status patch.
    expected = {"ConfigurationError", "OOMKilled", "Unschedulable", "ErrImagePull"}
    wait_for(lambda: expected <= {e["reason"] for e in cluster.events() if e.get("type") == "Warning"}, 10,
             "Warning events")


def test_a_failed_reconcile_is_retried_until_it_succeeds(cluster, env, kubelet, operator):
    """Kopf does not retry event handlers: the operator does. A Job of someone else's (suspended,
    unlabelled: nothing of it reaches the operator's watches) has the name the trainer Job needs;
    the FineTuneJob cannot proceed (and says why in a Warning Event) until the clash is gone, then
    converges without any new event about it."""
    ready_dataset(cluster, env["bucket"])
    cluster.request("POST", "/apis/batch/v1/namespaces/default/jobs",
                    {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "clash-train-1"},
                     "spec": {"suspend": True, "template": {"spec": {"containers": [
                         {"name": "main", "image": "busybox", "command": ["true"]}], "restartPolicy": "Never"}}}})
    cluster.create(finetunejob_manifest("clash", "ready", "s3://x/model", f"s3://{env['bucket']}/runs/clash"))
    warning = wait_for(lambda: [e for e in cluster.events(name="clash") if e.get("reason") == "ReconcileError"], 30,
                       "a ReconcileError Event")
    assert "belongs to another owner" in warning[0]["message"] and warning[0]["type"] == "Warning"
    assert status_of(cluster, "clash").get("phase") in (None, "Pending")
    assert cluster.get("v1", "configmaps", "default", "clash-train-1") is None  # nothing half-made
    cluster.request("DELETE", "/apis/batch/v1/namespaces/default/jobs/clash-train-1")
    queued = wait_for(lambda: phase(cluster, "clash") in ("Queued", "Training") and status_of(cluster, "clash"), 30,
                      "the retried reconcile")
    assert queued["trainerJob"] == "clash-train-1"
    job = cluster.get("batch/v1", "jobs", "default", "clash-train-1")
    assert job["metadata"]["ownerReferences"][0]["name"] == "clash"
    assert len([e for e in cluster.events(name="clash") if e.get("reason") == "ReconcileError"]) == 1
