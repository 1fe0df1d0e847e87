"""End to end: a curated Dataset and a balanced FineTuneJob through the real operator.

A GovernancePolicy with an evalSetURI applies to the namespace; the Dataset turns every curation
step on over a planted source (tests/curation_planted.py) that also leaks the policy's evaluation
question. The validation Job (the real command, run by the fake kubelet) removes the planted
near-duplicates, the low-quality lines and the leak; status carries the bounded stats and the
SmallDataset warning; the FineTuneJob balances its training data by a word rule, trains, and
passes the provenance check, which re-validates the source with the same evaluation files.
"""

from __future__ import annotations

import json
import time

from operator_e2e import dataset_manifest, finetunejob_manifest, phase
from kube_emulator import wait_for

import curation_planted as planted
from finetune_operator.conditions import get_condition
from finetune_trainer import storage

LEAK = {"prompt": "Which river flows through the old city of Kavoro in the spring?",
        "answer": "The Zevodo river, swollen by the snowmelt from the northern hills."}


def test_curated_dataset_and_balanced_job_end_to_end(cluster, env, kubelet, operator, model_uri):
    bucket = env["bucket"]
    policy_set = f"s3://{bucket}/policy/eval.jsonl"
    storage.write_text(policy_set, json.dumps(LEAK) + "\n")
    cluster.create({"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy",
                    "metadata": {"name": "team-eval"},
                    "spec": {"required": ["provenance"], "evaluation": {"evalSetURI": policy_set}}})
    time.sleep(2)  # the operator's policy index sees it before the Dataset's first reconcile

    source, _, truth = planted.generate(77, distinct=150, clusters=25, leaks=0, evals=10, embedded=0,
                                        boilerplate=25)
    leak_line = json.dumps({"messages": [{"role": "user", "content": "Quick one. " + LEAK["prompt"]},
                                         {"role": "assistant", "content": LEAK["answer"]}]})
    source.append(leak_line)
    source_uri = f"s3://{bucket}/raw/planted.jsonl"
    storage.write_text(source_uri, "\n".join(source) + "\n")
    curation = {"minExamples": 10, "nearDuplicates": {}, "quality": {}, "decontamination": {}}
    cluster.create(dataset_manifest("curated", source_uri, curation=curation))

    ds = wait_for(lambda: phase(cluster, "curated", "datasets") in ("Ready", "Invalid", "Failed")
                  and cluster.dataset("curated"), 90, "Dataset validated")
    status = ds["status"]
    assert status["phase"] == "Ready", (status, kubelet.log("curated-"))
    stats = status["stats"]["curation"]
    assert stats["evalSetURIs"] == [policy_set]
    removed = {s["step"]: s for s in stats["steps"]}
    assert removed["decontamination"]["lines"] == [len(source)], removed["decontamination"]
    removed_lines = [json.loads(line) for line in storage.read_text(stats["removedURI"]).splitlines()]
    figures = planted.measure("\n".join(json.dumps(e) for e in removed_lines), truth)
    assert figures.recall >= 0.95 and figures.falsely_removed <= 3, figures
    assert sum(s["removed"] for s in stats["steps"]) == len(removed_lines)
    small = get_condition(status["conditions"], "SmallDataset")
    assert small["status"] == "True" and str(status["stats"]["examples"]) in small["message"]
    assert get_condition(status["conditions"], "Ready")["status"] == "True"

    balance = {"rules": [{"group": "how", "anyOf": ["how"]}], "defaultGroup": "rest"}
    cluster.create(finetunejob_manifest("balanced", "curated", model_uri, f"s3://{bucket}/runs/balanced",
                                        training={"balance": balance}))
    done = wait_for(lambda: phase(cluster, "balanced") in ("Succeeded", "Failed") and cluster.ftj("balanced"), 200,
                    "FineTuneJob finished")
    job = done["status"]
    assert job["phase"] == "Succeeded", (job, kubelet.log("balanced-"))
    groups = {g["name"]: g for g in job["balance"]["groups"]}
    assert set(groups) == {"how", "rest"} and job["balance"]["before"] == job["balance"]["after"]
    assert abs(groups["how"]["after"] - groups["rest"]["after"]) <= 1
    assert groups["how"]["before"] != groups["rest"]["before"]  # it was skewed, now it is not
    manifest = json.loads(storage.read_text(f"{job['adapter']['uri']}/manifest.json"))
    assert manifest["dataset"]["balance"] == job["balance"]
    provenance = next(c for c in job["governance"]["checks"] if c["name"] == "provenance")
    assert provenance["passed"], provenance["message"]
