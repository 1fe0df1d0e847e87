"""End to end: Dataset + FineTuneJob -> validation Job -> trainer Job -> real trainer -> Succeeded.

The operator runs for real against the emulated API server; the fake kubelet runs the real
`finetune-trainer validate / train / governance` commands from the Jobs it sees; data, the
tiny model, checkpoints and adapters live in moto's S3.
"""

from __future__ import annotations

import json

from operator_e2e import dataset_manifest, finetunejob_manifest, phase, write_raw_dataset
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage


def test_dataset_and_finetunejob_end_to_end(cluster, env, kubelet, operator, model_uri):
    source = write_raw_dataset(env["bucket"])
    output = f"s3://{env['bucket']}/runs/e2e"
    cluster.create(finetunejob_manifest("e2e", "ds", model_uri, output))
    cluster.create(dataset_manifest("ds", source))

    # The job waits for its Dataset and says why.
    waiting = wait_for(lambda: phase(cluster, "e2e") == "WaitingForDataset" and cluster.ftj("e2e"), 20)
    assert get_condition(waiting["status"]["conditions"], "DatasetReady")["status"] == "False"

    ds = wait_for(lambda: phase(cluster, "ds", "datasets") == "Ready" and cluster.dataset("ds"), 60,
                  "Dataset Ready")
    assert ds["status"]["stats"]["examples"] >= 10 and ds["status"]["digest"].startswith("sha256:")
    assert ds["status"]["validatedURI"].startswith(f"s3://{env['bucket']}/store/datasets/default/ds/1")

    job = wait_for(lambda: cluster.get("batch/v1", "jobs", "default", "e2e-train-1"), 20, "trainer Job")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert job["metadata"]["labels"]["finetune.dev/finetunejob"] == "e2e"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/finetune-operator/trainer:test"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])  # gpusPerNode: 0 runs on CPU
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e} \
        ["AWS_SECRET_ACCESS_KEY"] == "s3-creds"
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [3]
    assert cluster.get("v1", "configmaps", "default", "e2e-train-1")["data"]["job.json"]

    done = wait_for(lambda: phase(cluster, "e2e") in ("Succeeded", "Failed") and cluster.ftj("e2e"), 150,
                    "FineTuneJob finished")
    status = done["status"]
    assert status["phase"] == "Succeeded", (status, kubelet.log("e2e-"))
    adapter = status["adapter"]
    assert adapter["digest"].startswith("sha256:") and adapter["uri"].startswith(f"{output}/adapters/")
    result = json.loads(storage.read_text(f"{output}/result.json"))
    assert result["digest"] == adapter["digest"]
    assert status["progress"]["percent"] == 100 and status["progress"]["totalSteps"] == 6
    assert status["promotion"]["state"] == "Promoted"
    alias = json.loads(storage.read_text(status["promotion"]["aliasURI"]))
    assert alias["adapterDigest"] == adapter["digest"]
    for cond in ("DatasetReady", "Trained", "GovernancePassed", "Promoted"):
        assert get_condition(status["conditions"], cond)["status"] == "True", cond
    expected = {"WaitingForDataset", "TrainerJobCreated", "TrainingStarted", "Trained", "Promoted"}
    wait_for(lambda: expected <= {e["reason"] for e in cluster.events(name="e2e")}, 10, "Events")
    # Secrets never reach status or events.
    assert "testing" not in json.dumps(status) and "testing" not in json.dumps(cluster.events())
