"""End to end: seed Dataset -> SyntheticDataset -> review -> its Dataset -> FineTuneJob, through the real operator.

The generator is a tiny model that learnt to continue Self-Instruct prompts (tests/memorized_generator.py);
every Job runs the real command in the fake kubelet. Reviewing is `ftctl review NAME --import` against
the emulated API server (the keyboard path is tests/ftctl/test_review_tmux.py): it finds the work
folder in status, records the decisions and annotates the object, and the operator moves on at once.
The FineTuneJob trained on the grown data passes the provenance check, which verifies the synthetic
chain line by line; the adapter manifest names the Dataset digest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from operator_e2e import dataset_manifest, finetunejob_manifest, phase
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import review, storage
from testutil import REPO

SEEDS = REPO / "examples" / "quickstart" / "data" / "support-answers.jsonl"


def synthetic_manifest(name: str, seed: str, generator_uri: str, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "SyntheticDataset",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"seed": {"dataset": seed}, "generator": {"baseModel": {"uri": generator_uri}},
                     "examples": 6, "format": "instruction",
                     "sampling": {"maxNewTokens": 40, "seed": 3, "temperature": 0.9},
                     "review": {"fraction": 0.5, "minAcceptanceRate": 0.5},
                     "curation": {"minExamples": 3, "piiPolicy": "reject"},
                     "evaluation": {"fraction": 0.2}, **spec}}


def test_seed_to_synthetic_to_reviewed_dataset_to_trained_adapter(cluster, env, kubelet, operator,
                                                                   memorized_generator_dir,
                                                                   model_uri, tmp_path):
    from trainer.helpers import upload_folder

    bucket = env["bucket"]
    seed_uri = f"s3://{bucket}/raw/seed.jsonl"
    storage.write_text(seed_uri, SEEDS.read_text())
    seed = dataset_manifest("seed", seed_uri, min_examples=20)
    seed["spec"]["format"] = "instruction"
    cluster.create(seed)
    generator_uri = f"s3://{bucket}/models/generator"
    upload_folder(memorized_generator_dir, generator_uri)
    cluster.create(synthetic_manifest("grown", "seed", generator_uri))

    obj = wait_for(lambda: phase(cluster, "grown", "syntheticdatasets") in ("Reviewing", "Invalid", "Failed")
                   and cluster.get("finetune.dev/v1alpha1", "syntheticdatasets", "default", "grown"),
                   150, "candidates generated")
    status = obj["status"]
    assert status["phase"] == "Reviewing", (status, kubelet.log("grown-"))
    gen = status["generation"]
    assert gen["kept"] >= 3 and gen["requested"] == 6, gen
    assert status["review"]["pending"] == gen["reviewRequired"] >= 1
    assert get_condition(status["conditions"], "ReviewPending")["status"] == "True"
    assert status["lineage"]["seedDigest"] == cluster.dataset("seed")["status"]["digest"]
    work = status["workURI"]
    assert storage.exists(storage.join(work, "candidates.jsonl"))

    # People review (as an Argilla export would say it): accept all but one sampled candidate.
    pending = review.pending(work)
    lines = [{"id": c.id, "verdict": "accepted", "reviewer": "ana", "at": "2026-12-01T10:00:00Z", "via": "import"}
             for c in pending]
    if len(lines) > 1:
        lines[-1]["verdict"] = "rejected"
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = subprocess.run([sys.executable, "-m", "finetune_operator.ftctl.main", "--namespace", "default", "review",
                          "grown", "--import", str(decisions), "--reviewer", "ana"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    annotated = cluster.get("finetune.dev/v1alpha1", "syntheticdatasets", "default", "grown")
    assert "finetune.dev/reviewed-at" in annotated["metadata"].get("annotations", {})

    obj = wait_for(lambda: phase(cluster, "grown", "syntheticdatasets") in ("Ready", "Invalid", "Failed")
                   and cluster.get("finetune.dev/v1alpha1", "syntheticdatasets", "default", "grown"),
                   150, "review finalized and the Dataset validated")
    status = obj["status"]
    assert status["phase"] == "Ready", (status, kubelet.log("grown-"))
    assert status["review"]["reviewed"] == len(lines) and status["review"]["pending"] == 0
    child = cluster.dataset("grown")
    assert child["status"]["phase"] == "Ready"
    assert child["metadata"]["ownerReferences"][0]["kind"] == "SyntheticDataset"
    chain = child["spec"]["provenance"]["synthetic"]
    assert chain["seedDigest"] == status["lineage"]["seedDigest"] and chain["seedDataset"] == "seed"
    reviewed = [json.loads(line) for line in storage.read_text(storage.join(work, "reviewed.jsonl")).splitlines()]
    assert all(line["metadata"]["synthetic.seedDigest"] == chain["seedDigest"] for line in reviewed)
    rejected = {line["id"] for line in lines if line["verdict"] == "rejected"}
    assert not rejected & {line["metadata"]["synthetic.id"] for line in reviewed}

    cluster.create({"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy",
                    "metadata": {"name": "provenance-only"}, "spec": {"required": ["provenance"]}})
    cluster.create(finetunejob_manifest("on-grown", "grown", model_uri, f"s3://{bucket}/runs/on-grown",
                                        training={"maxSteps": 2}))
    done = wait_for(lambda: phase(cluster, "on-grown") in ("Succeeded", "Failed") and cluster.ftj("on-grown"), 240,
                    "FineTuneJob on the grown Dataset finished")
    job = done["status"]
    assert job["phase"] == "Succeeded", (job, kubelet.log("on-grown-"))
    provenance = next(c for c in job["governance"]["checks"] if c["name"] == "provenance")
    assert provenance["passed"], provenance["message"]
    report = json.loads(storage.read_text(provenance["reportURI"]))
    rules = {f["rule"]: f for f in report["findings"]}
    # The synthetic chain was verified line by line, not only declared.
    for rule in ("syntheticCandidates", "syntheticReview", "syntheticLineage", "syntheticExamples"):
        assert rules[rule]["passed"], rules[rule]
    assert report["declared"]["synthetic"]["candidatesDigest"] == chain["candidatesDigest"]
    manifest = json.loads(storage.read_text(f"{job['adapter']['uri']}/manifest.json"))
    assert manifest["dataset"]["digest"] == child["status"]["digest"]
