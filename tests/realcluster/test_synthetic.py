"""SyntheticDataset on the REAL control plane: the operator's Jobs on fakenode, review through ftctl against
the real API server, the child Dataset with an owner reference the garbage collector honours.

The generator is tests/memorized_generator.py's tiny model (it writes parseable, novel candidates);
the seed is the quickstart's data, validated by the operator's validation Job.
"""

from __future__ import annotations

import json

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import review, storage
from testutil import REPO

SEEDS = REPO / "examples" / "quickstart" / "data" / "support-answers.jsonl"


@pytest.fixture(scope="module")
def stack(fakenode, crds, s3_server, tiny_model_dir, tmp_path_factory):
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator")) as st:
        yield st


@pytest.fixture()
def ns(stack):
    name = h.new_namespace(stack.cluster, stack.prefix)
    yield name
    h.delete_namespace(stack.cluster, name)


def synthetic(name: str, ns: str, generator_uri: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "SyntheticDataset",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"seed": {"dataset": "seed"}, "generator": {"baseModel": {"uri": generator_uri}},
                     "examples": 5, "format": "instruction", "sampling": {"maxNewTokens": 40, "seed": 3},
                     "review": {"fraction": 0.5, "minAcceptanceRate": 0.5},
                     "curation": {"minExamples": 3}, "evaluation": {"fraction": 0.2}}}


def test_generate_review_with_ftctl_and_the_dataset_it_owns(stack, ns, memorized_generator_dir, tmp_path):
    from trainer.helpers import upload_folder

    c = stack.cluster
    seed_uri = f"s3://{stack.bucket}/raw/{ns}/seed.jsonl"
    storage.write_text(seed_uri, SEEDS.read_text())
    seed = h.dataset_manifest("seed", ns, seed_uri, min_examples=20)
    seed["spec"]["format"] = "instruction"
    generator_uri = f"s3://{stack.bucket}/models/generator-{ns}"
    upload_folder(memorized_generator_dir, generator_uri)
    c.apply([seed, synthetic("grown", ns, generator_uri)])

    def phase_in(*phases):
        obj = c.get("syntheticdataset", "grown", ns)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    try:
        obj = wait_for(lambda: phase_in("Reviewing", "Invalid", "Failed"), timeout=180, interval=1,
                       what="candidates generated")
    except AssertionError as exc:
        seen = {k: (c.get(k, n, ns, check=False) or {}).get("status") for k, n in
                (("syntheticdataset", "grown"), ("dataset", "seed"))}
        raise AssertionError(f"{exc}\n{seen}\n{stack.op.logs()[-3000:]}") from None
    status = obj["status"]
    assert status["phase"] == "Reviewing", status
    assert get_condition(status["conditions"], "ReviewPending")["status"] == "True"
    # The printer columns the CRD declares, as the real server prints them.
    table = c.kubectl("get", "syntheticdatasets", "-n", ns).stdout.split("\n")
    assert table[0].split()[:5] == ["NAME", "PHASE", "SEED", "KEPT", "PENDING"], table
    assert table[1].split()[:5] == ["grown", "Reviewing", "seed", str(status["generation"]["kept"]),
                                    str(status["review"]["pending"])], table
    reasons = {e["reason"] for e in h.events(c, ns, "grown")}
    assert {"Generating", "AwaitingReview"} <= reasons, reasons
    # kstatus: waiting for people is neither in progress nor stalled.
    assert get_condition(status["conditions"], "Reconciling")["status"] == "False"
    assert get_condition(status["conditions"], "Stalled")["status"] == "False"

    pending = review.pending(status["workURI"])
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text("".join(json.dumps({"id": p.id, "status": "accepted", "user": "ana"}) + "\n"
                                 for p in pending))  # an Argilla-style export
    run = h.ftctl(c, ns, "review", "grown", "--import", str(decisions))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "finetune.dev/reviewed-at" in c.get("syntheticdataset", "grown", ns)["metadata"]["annotations"]

    try:
        wait_for(lambda: phase_in("Ready", "Invalid", "Failed"), timeout=150, interval=1, what="review finalized")
    except AssertionError as exc:
        seen = {k: (c.get(k, "grown", ns, check=False) or {}).get("status") for k in ("syntheticdataset", "dataset")}
        raise AssertionError(f"{exc}\n{seen}\n{stack.op.logs()[-3000:]}") from None
    c.kubectl("wait", "--for=condition=Ready", "syntheticdataset/grown", "-n", ns, "--timeout=10s")
    child = c.get("dataset", "grown", ns)
    assert child["status"]["phase"] == "Ready"
    (owner,) = child["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner.get("controller")) == ("SyntheticDataset", "grown", True)
    assert child["spec"]["provenance"]["synthetic"]["seedDataset"] == "seed"

    # The garbage collector deletes the Dataset it owns with it.
    c.kubectl("delete", "syntheticdataset", "grown", "-n", ns)
    wait_for(lambda: c.get("dataset", "grown", ns, check=False) is None, timeout=60, interval=1,
             what="the child Dataset garbage-collected")
