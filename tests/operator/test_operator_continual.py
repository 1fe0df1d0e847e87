"""Continual fine-tuning through the real operator: a child waits for its parent's promotion, trains
from it with replay, keeps its lineage across an operator restart, is judged by the retention
check, takes over the parent's alias and is rolled back to it; a tampered parent fails its child
before any trainer Job exists."""

from __future__ import annotations

import json

from operator_e2e import API, dataset_manifest, finetunejob_manifest, phase, ready_dataset, running_operator, status_of
from kube_emulator import wait_for
from typer.testing import CliRunner

from finetune_operator.conditions import get_condition
from finetune_operator.ftctl.main import app
from finetune_trainer import storage


def validated_dataset(cluster, bucket: str, name: str, seed: int) -> None:
    """A Dataset already validated (another sample of the same kind of task)."""
    from trainer.helpers import write_dataset

    uri = write_dataset(f"s3://{bucket}/validated/{name}", seed=seed)
    manifest = dataset_manifest(name, f"s3://{bucket}/raw/unused.jsonl")
    manifest["status"] = {"phase": "Ready", "observedGeneration": 1, "validatedURI": uri,
                          "digest": "sha256:" + str(seed) * 64, "stats": {"examples": 48}}
    cluster.create(manifest)


def trainer_posts(cluster, job: str) -> int:
    return sum(1 for r in cluster.write_requests()
               if r.method == "POST" and str(r.url.path).endswith("/namespaces/default/jobs")
               and r.data["metadata"]["name"].startswith(f"{job}-train-"))


def test_child_waits_for_its_parent_trains_from_it_and_keeps_its_lineage_across_a_restart(
        cluster, env, kubelet, model_uri, tmp_path):
    bucket = env["bucket"]
    ready_dataset(cluster, bucket)  # "ready": task A
    validated_dataset(cluster, bucket, "later", seed=5)  # task B
    # One alias for the chain: the child's promotion moves it from the parent; a rollback moves it back.
    promotion = {"alias": "support", "aliasStore": f"s3://{bucket}/aliases"}
    cluster.create(finetunejob_manifest("parent", "ready", model_uri, f"s3://{bucket}/runs/parent",
                                        promotion=promotion))
    cluster.create(finetunejob_manifest(
        "child", "later", model_uri, f"s3://{bucket}/runs/child", initFrom={"fineTuneJob": {"name": "parent"}},
        training={"replay": {"datasets": ["ready"], "fraction": 0.25}, "maxSteps": 60, "checkpointEverySteps": 5},
        promotion=promotion))

    with running_operator():
        # The child waits, saying for what, until the parent is promoted; then it trains from it.
        waiting = wait_for(lambda: get_condition(status_of(cluster, "child").get("conditions") or [], "ParentReady"),
                           30, "ParentReady")
        assert waiting["status"] == "False" and waiting["reason"] == "WaitingForParent"
        assert phase(cluster, "child") == "Pending" and trainer_posts(cluster, "child") == 0
        parent = wait_for(lambda: phase(cluster, "parent") in ("Succeeded", "Failed") and status_of(cluster, "parent"),
                          150, "parent finished")
        assert parent["phase"] == "Succeeded", (parent, kubelet.log("parent-"))
        assert parent["promotion"]["state"] == "Promoted"
        lineage = wait_for(lambda: status_of(cluster, "child").get("lineage"), 30, "child lineage")
        wait_for(lambda: phase(cluster, "child") == "Training", 60, "child Training")
    assert lineage["parentDigest"] == parent["adapter"]["digest"] and lineage["source"] == "fineTuneJob/parent"
    assert lineage["chain"][0]["datasetURI"] == f"s3://{bucket}/validated/ready" and lineage["depth"] == 1

    # A new operator neither resolves the parent again nor starts a second trainer.
    with running_operator():
        done = wait_for(lambda: phase(cluster, "child") in ("Succeeded", "Failed") and status_of(cluster, "child"),
                        200, "child finished")
    assert done["phase"] == "Succeeded", (done.get("message"), kubelet.log("child-"))
    assert done["lineage"] == lineage and trainer_posts(cluster, "child") == 1
    assert done["replay"]["datasets"] == ["ready"] and done["replay"]["examplesPerEpoch"] > 0
    checks = {c["name"]: c for c in done["governance"]["checks"]}
    assert "retention" in done["governance"]["effectivePolicy"]["required"] and checks["retention"]["passed"], checks
    manifest = json.loads(storage.read_text(f"{done['adapter']['uri']}/manifest.json"))
    assert manifest["lineage"]["parent"]["digest"] == parent["adapter"]["digest"]
    assert manifest["replay"][0]["name"] == "ready"

    # ftctl walks the chain from the store: child -> parent -> base model.
    out = CliRunner().invoke(app, ["--kubeconfig", env["KUBECONFIG"], "lineage", "child"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == "FineTuneJob child: 2 adapter(s)"
    assert f"parent  {parent['adapter']['digest']}" in out.output and "job: parent  governance: passed" in out.output
    assert "base model" in out.output.splitlines()[-1]

    # The alias moved from the parent to the child, the parent first in its history.
    alias_uri = f"s3://{bucket}/aliases/support.json"
    assert done["promotion"]["aliasURI"] == parent["promotion"]["aliasURI"] == alias_uri
    record = json.loads(storage.read_text(alias_uri))
    assert record["adapterDigest"] == done["adapter"]["digest"]
    assert [h["adapterDigest"] for h in record["history"]] == [parent["adapter"]["digest"]]
    # `ftctl rollback support`: the child is taken out of service and the alias goes back to the parent.
    rolled = CliRunner().invoke(app, ["--kubeconfig", env["KUBECONFIG"], "rollback", "support"])
    assert rolled.exit_code == 0 and "child revoked: alias support" in rolled.output, rolled.output
    with running_operator():
        back = wait_for(lambda: (s := status_of(cluster, "child")).get("promotion", {}).get("state") == "RolledBack"
                        and s, 30, "child rolled back")
        wait_for(lambda: "RolledBack" in {e["reason"] for e in cluster.events(name="child")}, 10, "RolledBack Event")
    assert back["promotion"]["served"]["digest"] == parent["adapter"]["digest"]
    assert get_condition(back["conditions"], "Promoted")["reason"] == "RolledBack"
    record = json.loads(storage.read_text(alias_uri))
    assert record["adapterDigest"] == parent["adapter"]["digest"] and record["history"] == []
    assert record["rolledBack"]["adapterDigest"] == done["adapter"]["digest"]
    assert status_of(cluster, "parent")["promotion"]["state"] == "Promoted"  # the parent's record is kept


def test_a_tampered_parent_fails_the_child_before_any_trainer_job(cluster, env, kubelet, operator, model_uri):
    bucket = env["bucket"]
    ready_dataset(cluster, bucket)
    # An adapter folder whose weights no longer match its manifest.
    folder = f"s3://{bucket}/shared/tampered-adapter"
    storage.write_bytes(f"{folder}/adapter_model.safetensors", b"changed after training")
    manifest = json.dumps({"files": {"adapter_model.safetensors": {"sha256": "0" * 64, "size": 22}}}).encode()
    storage.write_bytes(f"{folder}/manifest.json", manifest)
    import hashlib

    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    cluster.create(finetunejob_manifest("orphan", "ready", model_uri, f"s3://{bucket}/runs/orphan",
                                        initFrom={"adapter": {"uri": folder, "digest": digest}}))
    done = wait_for(lambda: phase(cluster, "orphan") == "Failed" and status_of(cluster, "orphan"), 30, "Failed")
    failed = get_condition(done["conditions"], "Failed")
    assert failed["reason"] == "InitFromInvalid" and failed["message"].startswith("spec.initFrom (adapter)")
    assert "sha256 does not match the manifest" in failed["message"]
    assert trainer_posts(cluster, "orphan") == 0 and not done.get("trainerJob")
    wait_for(lambda: "InitFromInvalid" in {e["reason"] for e in cluster.events(name="orphan")}, 10, "Event")
    assert cluster.get(API, "finetunejobs", "default", "orphan")["status"]["phase"] == "Failed"
