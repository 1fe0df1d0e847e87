"""Continual fine-tuning on the real control plane: a child FineTuneJob waits for its parent's promotion,
trains from it with replay, and keeps its lineage (and its one trainer Job) when the operator is
SIGKILLed mid-training; `ftctl lineage` walks the chain; a tampered parent fails its child before any
trainer Job (docs/continual.md)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage


@pytest.fixture(scope="module")
def stack(fakenode, crds, s3_server, tiny_model_dir, tmp_path_factory):
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator")) as st:
        yield st


@pytest.fixture()
def ns(stack):
    name = h.new_namespace(stack.cluster, stack.prefix)
    yield name
    h.delete_namespace(stack.cluster, name)


def test_child_trains_from_its_promoted_parent_and_keeps_its_lineage_across_a_sigkill(stack, ns):
    c = stack.cluster
    h.ready_dataset(c, stack.bucket, ns)
    c.apply(h.finetunejob_manifest("parent", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/parent"))
    c.apply(h.finetunejob_manifest(
        "child", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/child",
        initFrom={"fineTuneJob": {"name": "parent"}},
        training={"maxSteps": 24, "checkpointEverySteps": 4, "replay": {"datasets": ["ready"], "fraction": 0.2}}))

    parent = h.wait_phase(c, ns, "parent", ("Succeeded", "Failed"), 180, stack.op)
    assert parent["phase"] == "Succeeded", parent
    training = wait_for(lambda: (s := h.status(c, ns, "child")).get("phase") == "Training"
                        and ((s.get("progress") or {}).get("step") or 0) >= 4 and s, timeout=120, interval=0.5,
                        what="child training")
    assert training["lineage"]["parentDigest"] == parent["adapter"]["digest"]
    assert get_condition(training["conditions"], "ParentReady")["status"] == "True"

    stack.op.kill()
    try:
        time.sleep(3)
    finally:
        stack.op.start()
    done = h.wait_phase(c, ns, "child", ("Succeeded", "Failed"), 240, stack.op)
    assert done["phase"] == "Succeeded", done
    assert done["lineage"] == training["lineage"]
    assert [j for j in h.jobs(c, ns) if j.startswith("child-train-")] == ["child-train-1"]
    assert done["replay"]["datasets"] == ["ready"]
    assert any(ch["name"] == "retention" and ch["passed"] for ch in done["governance"]["checks"]), done["governance"]
    manifest = json.loads(storage.read_text(f"{done['adapter']['uri']}/manifest.json"))
    assert manifest["lineage"]["parent"]["digest"] == parent["adapter"]["digest"]

    out = h.ftctl(c, ns, "lineage", "child")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "FineTuneJob child: 2 adapter(s)"
    assert parent["adapter"]["digest"] in out.stdout and "base model" in out.stdout.splitlines()[-1]


def test_a_tampered_parent_fails_the_child_before_any_trainer_job(stack, ns):
    c = stack.cluster
    h.ready_dataset(c, stack.bucket, ns)
    folder = f"s3://{stack.bucket}/shared/{ns}/tampered"
    storage.write_bytes(f"{folder}/adapter_model.safetensors", b"changed after training")
    manifest = json.dumps({"files": {"adapter_model.safetensors": {"sha256": "0" * 64, "size": 22}}}).encode()
    storage.write_bytes(f"{folder}/manifest.json", manifest)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    c.apply(h.finetunejob_manifest("orphan", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/orphan",
                                   initFrom={"adapter": {"uri": folder, "digest": digest}}))
    done = h.wait_phase(c, ns, "orphan", ("Failed", "Succeeded"), 60, stack.op)
    failed = get_condition(done["conditions"], "Failed")
    assert failed["reason"] == "InitFromInvalid" and failed["message"].startswith("spec.initFrom (adapter)")
    assert not [j for j in h.jobs(c, ns) if j.startswith("orphan-")]
    wait_for(lambda: any(e.get("reason") == "InitFromInvalid" for e in h.events(c, ns, "orphan")), timeout=30,
             interval=1, what="InitFromInvalid Event")
