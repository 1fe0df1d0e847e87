"""The attacker's side of the promotion gate, through the real operator (emulated API server, fake
kubelet running the real commands, moto S3).

A team that may create FineTuneJobs and write its own bucket tries to get an adapter promoted that
did not pass its checks:
- it names its own image (spec.image): training runs it, governance never does;
- it puts its own report where the operator reads it (tests/operator/forge.py stands in for the
  governance pod): unsigned, signed with its own key, a genuine report replayed from another run,
  a genuine report with its content edited under the original signature.
None is promoted, and each FineTuneJob says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from operator_e2e import OPERATOR_NAMESPACE, dataset_manifest, finetunejob_manifest, phase, status_of, \
    write_raw_dataset
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage

FORGE = str(Path(__file__).with_name("forge.py"))
DONE = ("Succeeded", "Failed", "AwaitingApproval")
GOVERNANCE = {"required": ["provenance"]}
ATTACKER_IMAGE = "registry.example/attacker/trainer:latest"


def test_forged_replayed_and_edited_reports_never_promote(cluster, env, kubelet, operator, model_uri):
    bucket = env["bucket"]
    cluster.create(dataset_manifest("clean", write_raw_dataset(bucket, n=40, key="raw/clean.jsonl")))
    wait_for(lambda: phase(cluster, "clean", "datasets") == "Ready", 90, "Dataset clean Ready")

    # A genuine run first: its image is the team's own; its checks pass; its signed report is real.
    cluster.create(finetunejob_manifest("genuine", "clean", model_uri, f"s3://{bucket}/runs/genuine",
                                        governance=GOVERNANCE, image=ATTACKER_IMAGE))
    genuine = wait_for(lambda: phase(cluster, "genuine") in DONE and status_of(cluster, "genuine"), 300, "genuine")
    assert genuine["phase"] == "Succeeded" and genuine["promotion"]["state"] == "Promoted", genuine
    assert genuine["governance"]["signingKey"]
    card = storage.read_text(genuine["promotion"]["modelCardURI"])  # written on promotion, beside the adapter
    assert genuine["adapter"]["digest"] in card and genuine["governance"]["signingKey"] in card
    trainer_job = cluster.get("batch/v1", "jobs", "default", genuine["trainerJob"])
    assert trainer_job["spec"]["template"]["spec"]["containers"][0]["image"] == ATTACKER_IMAGE
    # Governance ran the platform's image, in the operator's namespace, never the team's.
    gov_job = cluster.get("batch/v1", "jobs", OPERATOR_NAMESPACE, genuine["governanceJob"])
    assert gov_job["spec"]["template"]["spec"]["containers"][0]["image"] == env["FINETUNE_TRAINER_IMAGE"]
    assert cluster.get("batch/v1", "jobs", "default", genuine["governanceJob"]) is None
    genuine_report = genuine["governance"]["reportURI"]

    forged = {"unsigned": "no DSSE envelope", "self-signed": "signed by an untrusted key",
              "replay": "belongs to another FineTuneJob", "edited": "edited after signing"}
    for mode in forged:
        name = f"forge-{mode}"
        kubelet.declare(f"default-{name}-gov", command=[sys.executable, FORGE, mode, "/etc/finetune/job.json",
                                                         genuine_report])
        cluster.create(finetunejob_manifest(name, "clean", model_uri, f"s3://{bucket}/runs/{name}",
                                            governance=GOVERNANCE, image=ATTACKER_IMAGE))
    for mode, why in forged.items():
        name = f"forge-{mode}"
        status = wait_for(lambda: phase(cluster, name) in DONE and status_of(cluster, name), 300, name)
        assert status["phase"] == "Failed", (mode, status)
        assert status["promotion"]["state"] == "Blocked" and status["promotion"]["reason"] == "ReportInvalid", status
        promoted = get_condition(status["conditions"], "Promoted")
        assert promoted["status"] == "False" and why in promoted["message"], (mode, promoted)
        assert all(not c["passed"] for c in status["governance"]["checks"]), status["governance"]
        assert "signingKey" not in status["governance"]
        assert not storage.exists(f"s3://{bucket}/runs/{name}/aliases/{name}.json")
        assert "modelCardURI" not in status["promotion"]  # no card for what was not promoted
        events = [e for e in cluster.events("default", name) if e["reason"] == "ReportInvalid"]
        assert events and why in events[0]["message"], (mode, events)
        # The report it would have been promoted on is still there, for people to see.
        assert json.loads(storage.read_text(status["governance"]["reportURI"]))
