"""Restart safety, suspend/resume from a checkpoint, and deletion cleanup."""

from __future__ import annotations

import sys

from operator_e2e import finetunejob_manifest, phase, ready_dataset, running_operator, status_of
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage


def trainer_job_posts(cluster) -> int:
    return sum(1 for r in cluster.write_requests()
               if r.method == "POST" and str(r.url.path).endswith("/namespaces/default/jobs")
               and "-train-" in r.data["metadata"]["name"])


def test_restart_mid_training_then_suspend_and_resume(cluster, env, kubelet, model_uri):
    ready_dataset(cluster, env["bucket"])
    output = f"s3://{env['bucket']}/runs/life"
    cluster.create(finetunejob_manifest("life", "ready", model_uri, output,
                                        training={"maxSteps": 300, "checkpointEverySteps": 20}))

    with running_operator():
        wait_for(lambda: phase(cluster, "life") == "Training", 60, "Training")
    # The operator is gone while the trainer keeps running; a new one converges without a second Job.
    with running_operator():
        progress = wait_for(lambda: (status_of(cluster, "life").get("progress") or {}).get("step"), 60, "progress")
        assert progress >= 1
        assert trainer_job_posts(cluster) == 1 and kubelet.started_jobs == ["life-train-1"]
        assert phase(cluster, "life") == "Training"

        # Suspend: the Job is suspended in place (its pod gets SIGTERM; the trainer checkpoints and exits 5).
        cluster.update_spec("finetunejobs", "life", {"suspend": True})
        wait_for(lambda: phase(cluster, "life") == "Suspended", 30, "Suspended")
        wait_for(lambda: cluster.get("batch/v1", "jobs", "default", "life-train-1")["spec"].get("suspend"), 30,
                 "Job .spec.suspend")
        wait_for(lambda: any(p.startswith("life-train-1") and code == 5 for p, code in kubelet.exit_codes.items()),
                 60, "exit code 5 after SIGTERM")
        assert any(k.startswith("checkpoints/") for k in storage.list_keys(output))
        assert get_condition(status_of(cluster, "life")["conditions"], "Suspended")["status"] == "True"

        # Resume: the same Job is unsuspended; its new pod continues from the checkpoint.
        cluster.update_spec("finetunejobs", "life", {"suspend": False})
        done = wait_for(lambda: phase(cluster, "life") in ("Succeeded", "Failed") and status_of(cluster, "life"),
                        150, "finished")
    assert done["phase"] == "Succeeded", (done, kubelet.log("life-"))
    assert done["trainerJob"] == "life-train-1" and kubelet.started_jobs[:2] == ["life-train-1", "life-train-1"]
    assert "resumed from checkpoint" in kubelet.log("life-train-1")
    assert done["progress"]["totalSteps"] == 300 and done["adapter"]["digest"].startswith("sha256:")
    assert get_condition(done["conditions"], "Suspended")["status"] == "False"
    assert trainer_job_posts(cluster) == 1


STAND_IN = """
import time
from finetune_trainer import storage
storage.write_text("{out}/checkpoints/step-2/state.json", "{{}}")
storage.write_text("{out}/adapters/{hex}/manifest.json", "{{}}")
time.sleep(300)
"""


def test_delete_removes_children_and_checkpoints_but_not_adapters(cluster, env, kubelet, operator):
    ready_dataset(cluster, env["bucket"])
    output = f"s3://{env['bucket']}/runs/gone"
    kubelet.declare("gone-", command=[sys.executable, "-c", STAND_IN.format(out=output, hex="ab" * 32)])
    cluster.create(finetunejob_manifest("gone", "ready", "s3://x/model", output))
    wait_for(lambda: phase(cluster, "gone") == "Training", 30, "Training")
    wait_for(lambda: storage.exists(f"{output}/checkpoints/step-2/state.json"), 30, "checkpoint written")
    # Once training has started, the finalizer guards the checkpoint cleanup.
    wait_for(lambda: "finetune.dev/cleanup" in (cluster.ftj("gone")["metadata"].get("finalizers") or []), 20)

    cluster.delete("finetune.dev/v1alpha1", "finetunejobs", "default", "gone")
    wait_for(lambda: cluster.ftj("gone") is None, 30, "FineTuneJob gone")
    wait_for(lambda: not [j for j in cluster.list("batch/v1", "jobs", "default")
                          if j["metadata"]["labels"].get("finetune.dev/finetunejob") == "gone"], 20, "Jobs collected")
    assert not [c for c in cluster.list("v1", "configmaps", "default")
                if (c["metadata"].get("labels") or {}).get("finetune.dev/finetunejob") == "gone"]
    keys = storage.list_keys(output)
    assert not [k for k in keys if k.startswith("checkpoints/")], keys
    assert f"adapters/{'ab' * 32}/manifest.json" in keys
