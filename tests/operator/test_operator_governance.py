"""Governance through the real operator path: emulated API server, fake kubelet running the real
`finetune-trainer validate / train / governance` commands, moto S3.

Seeded cases run side by side in one operator session: a Dataset without a license, PII allowed
into the data, an adapter that did not learn, a Dataset edited after validation (each blocks
promotion with the failing check named, and no approval can override it), PII redaction, and
manual promotion (an approval naming another digest is ignored; the right one promotes).
"""

from __future__ import annotations

import json
import random

from operator_e2e import dataset_manifest, finetunejob_manifest, phase, status_of, write_raw_dataset
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage

CONTACTS = [f"Reach {name} at {name}@example.com or call 555-{100 + i:03d}-{2000 + i:04d}."
            for i, name in enumerate(["ana", "ben", "chloe", "dev", "eli", "fay", "gus", "hana", "ivan", "june",
                                      "kai", "lena"])]
DONE = ("Succeeded", "Failed", "AwaitingApproval")


def contact_records(n: int = 24) -> list[str]:
    rng = random.Random(5)
    return [json.dumps({"messages": [{"role": "user", "content": f"How do I contact person {i}?"},
                                     {"role": "assistant", "content": rng.choice(CONTACTS)}]}) for i in range(n)]


def governed_job(name: str, dataset: str, model_uri: str, bucket: str, required: list[str], **spec) -> dict:
    governance = {"required": required, **spec.pop("governance", {})}
    return finetunejob_manifest(name, dataset, model_uri, f"s3://{bucket}/runs/{name}", governance=governance,
                                **spec)


def blocked_by(status: dict, check: str) -> None:
    assert status["phase"] == "Failed", status
    assert status["promotion"]["state"] == "Blocked" and status["promotion"]["reason"] == "GovernanceFailed"
    failing = [c["name"] for c in status["governance"]["checks"] if not c["passed"]]
    assert failing == [check], status["governance"]["checks"]
    assert get_condition(status["conditions"], "GovernancePassed")["status"] == "False"
    promoted = get_condition(status["conditions"], "Promoted")
    assert promoted["status"] == "False" and promoted["reason"] == "GovernanceFailed", promoted
    assert check in promoted["message"]


def test_seeded_governance_cases_through_the_operator(cluster, env, kubelet, operator, model_uri):
    bucket = env["bucket"]
    clean = write_raw_dataset(bucket, n=40, key="raw/clean.jsonl")
    cluster.create(dataset_manifest("clean", clean))
    nolicense = dataset_manifest("nolicense", clean)
    nolicense["spec"]["provenance"] = {"origin": "scraped from somewhere", "consent": "not-required"}
    cluster.create(nolicense)
    contacts = f"s3://{bucket}/raw/contacts.jsonl"
    storage.write_text(contacts, "\n".join(contact_records()) + "\n")
    personal = {"origin": "CRM export", "license": "proprietary-internal", "consent": "obtained",
                "containsPersonalData": True}
    cluster.create(dataset_manifest("contacts", contacts, provenance=personal,
                                    curation={"minExamples": 10, "piiPolicy": "allow"}))
    cluster.create(dataset_manifest("redacted", contacts, provenance=personal,
                                    curation={"minExamples": 10, "piiPolicy": "redact"}))
    mutable = write_raw_dataset(bucket, n=40, key="raw/mutable.jsonl")
    cluster.create(dataset_manifest("mutable", mutable))

    for name in ("clean", "nolicense", "contacts", "redacted", "mutable"):
        wait_for(lambda: phase(cluster, name, "datasets") == "Ready", 90, f"Dataset {name} Ready")

    # Redaction: the findings are counted, and the validated data no longer holds them.
    redacted = cluster.dataset("redacted")["status"]
    assert redacted["piiFindings"].get("email", 0) >= 12 and redacted["piiFindings"].get("phone", 0) >= 12
    validated = storage.read_text(storage.join(redacted["validatedURI"], "train.jsonl"))
    assert "@example.com" not in validated and "[EMAIL]" in validated

    # The source of `mutable` changes after it was validated: what the job trains on no longer
    # matches what the Dataset now holds.
    storage.write_text(mutable, storage.read_text(mutable).replace("Reverse", "Invert"))

    cluster.create(governed_job("unlicensed", "nolicense", model_uri, bucket, ["provenance"]))
    cluster.create(governed_job("leaky", "contacts", model_uri, bucket, ["pii"]))
    cluster.create(governed_job("lazy", "clean", model_uri, bucket, ["evaluation"],
                                training={"maxSteps": 1, "learningRate": 1e-7},
                                governance={"evaluation": {"minRelativeImprovement": 0.01}}))
    cluster.create(governed_job("stale", "mutable", model_uri, bucket, ["provenance"]))
    cluster.create(governed_job("manual", "clean", model_uri, bucket, ["provenance"],
                                promotion={"mode": "manual", "alias": "manual-prod"}))

    statuses = {}
    for name in ("unlicensed", "leaky", "lazy", "stale", "manual"):
        statuses[name] = wait_for(lambda: phase(cluster, name) in DONE and status_of(cluster, name), 300,
                                  f"{name} finished")

    blocked_by(statuses["unlicensed"], "provenance")
    assert "license" in statuses["unlicensed"]["governance"]["checks"][0]["message"]
    blocked_by(statuses["leaky"], "pii")
    blocked_by(statuses["lazy"], "evaluation")
    blocked_by(statuses["stale"], "provenance")
    assert "changed" in statuses["stale"]["governance"]["checks"][0]["message"]
    for name in ("unlicensed", "leaky", "lazy", "stale"):
        digest = statuses[name]["adapter"]["digest"]
        assert statuses[name]["governance"]["adapterDigest"] == digest  # results bound to the artifact
        assert not storage.exists(f"s3://{bucket}/runs/{name}/aliases/{name}.json")

    # No approval overrides a failed check, even one naming the right digest.
    digest = statuses["unlicensed"]["adapter"]["digest"]
    cluster.update_spec("finetunejobs", "unlicensed", {"promotion": {"mode": "manual",
                                                                     "approval": {"digest": digest}}})
    wait_for(lambda: cluster.ftj("unlicensed")["status"]["observedGeneration"] == 2, 30, "approval seen")
    assert status_of(cluster, "unlicensed")["promotion"]["state"] == "Blocked"
    assert not storage.exists(f"s3://{bucket}/runs/unlicensed/aliases/unlicensed.json")

    # Manual promotion: waits; an approval of another digest is ignored; the right one promotes.
    manual = statuses["manual"]
    assert manual["phase"] == "AwaitingApproval" and manual["promotion"]["state"] == "AwaitingApproval"
    digest = manual["adapter"]["digest"]
    cluster.update_spec("finetunejobs", "manual", {"promotion": {"approval": {
        "digest": "sha256:" + "1" * 64, "approvedBy": "mallory"}}})
    wait_for(lambda: cluster.ftj("manual")["status"]["observedGeneration"] == 2, 30, "wrong approval seen")
    ignored = status_of(cluster, "manual")
    assert ignored["phase"] == "AwaitingApproval" and ignored["promotion"].get("approvedBy") is None
    assert not storage.exists(f"s3://{bucket}/runs/manual/aliases/manual-prod.json")
    cluster.update_spec("finetunejobs", "manual", {"promotion": {"approval": {"digest": digest, "approvedBy": "alice"}}})
    done = wait_for(lambda: phase(cluster, "manual") == "Succeeded" and status_of(cluster, "manual"), 30, "promoted")
    assert done["promotion"]["state"] == "Promoted" and done["promotion"]["approvedBy"] == "alice"
    alias = json.loads(storage.read_text(f"s3://{bucket}/runs/manual/aliases/manual-prod.json"))
    assert alias["adapterDigest"] == digest

    # The platform team changes policy: a cluster GovernancePolicy now applies (it replaces the
    # operator's default and accepts the PII the `leaky` job trained on). Every job whose governance
    # failed runs its checks again under it, recorded as run 2; the promoted job is left alone.
    rerun_policy = {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy",
                    "metadata": {"name": "accept-contacts"},
                    "spec": {"required": ["pii"], "pii": {"maxFindings": 100000, "maxMemorizationRate": 1.0}}}
    cluster.create(rerun_policy)
    blocked = ("unlicensed", "leaky", "lazy", "stale")
    reruns = {}
    for name in blocked:
        reruns[name] = wait_for(lambda: (status_of(cluster, name).get("governance") or {}).get("runs") == 2
                                and phase(cluster, name) in DONE and status_of(cluster, name), 300, f"{name} rerun")
    for name in blocked:
        gov = reruns[name]["governance"]
        assert [h["run"] for h in gov["history"]] == [1] and gov["history"][0]["passed"] is False
        assert gov["history"][0]["failing"] == [c["name"] for c in statuses[name]["governance"]["checks"]
                                                if not c["passed"]]
        assert gov["history"][0]["reportDigest"] == statuses[name]["governance"]["reportDigest"]
        assert gov["policyDigest"] != gov["history"][0]["policyDigest"]
        assert gov["reportURI"].endswith("/governance/run-2.json") and storage.exists(gov["reportURI"])
        assert storage.exists(gov["history"][0]["reportURI"])  # the first run's report is kept
        assert reruns[name]["governanceJob"] != statuses[name]["governanceJob"]
        assert "pii" in [c["name"] for c in gov["checks"]]  # the new policy's requirement ran
        reasons = [e.get("reason") for e in cluster.events(name=name)]
        assert "GovernanceRerun" in reasons, reasons
    leaky = reruns["leaky"]
    assert leaky["phase"] == "Succeeded" and leaky["promotion"]["state"] == "Promoted", leaky["governance"]
    assert json.loads(storage.read_text(f"s3://{bucket}/runs/leaky/aliases/leaky.json"))["adapterDigest"] == \
        leaky["adapter"]["digest"]
    for name in ("unlicensed", "lazy", "stale"):
        blocked_by(reruns[name], statuses[name]["governance"]["checks"][0]["name"])
    assert status_of(cluster, "manual")["governance"]["runs"] == 1  # promoted: not re-judged
