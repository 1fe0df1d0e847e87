"""MODEL_CARD.md on promotion (modelcard.py through the real decisions): Hugging Face front matter,
the adapter's lineage and governance results, and a Dataset's hostile strings kept inert."""

from __future__ import annotations

import re

import yaml

from finetune_operator import decisions, modelcard

import test_decisions as td


def promoted(**dataset_provenance):
    """A job through training and governance to promotion, with its plan."""
    status = {**td.queued(), "phase": "Training", "startTime": "2026-01-01T00:00:00Z"}
    result = {"adapterURI": "s3://out/j/adapters/ab", "digest": td.DIGEST, "sizeBytes": 10,
              "metrics": {"evalLoss": 1.5}}
    dataset = td.ready_dataset()
    if dataset_provenance:
        dataset["spec"]["provenance"] = {**(dataset["spec"].get("provenance") or {}), **dataset_provenance}
    plan = decisions.plan_finetunejob(td.ftj(status), decisions.JobInputs(dataset=dataset, trainer_job=td.job(
        complete=True), result=result), td.CFG, td.NOW)
    gov_job = [m for m in plan.create if m["kind"] == "Job"][0]
    inputs = decisions.JobInputs(dataset=dataset, governance_job=td.job(gov_job["metadata"]["name"], complete=True),
                                 keys=td.KEYS, report=td.signed_report([]), manifest_ok=(True, "ok"))
    return decisions.plan_finetunejob(td.ftj(plan.status), inputs, td.CFG, td.NOW)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


def test_promotion_writes_a_model_card_beside_the_adapter_and_links_it():
    done = promoted(license="CC-BY-4.0")
    assert done.status["phase"] == "Succeeded"
    uri, text = done.model_card
    assert uri == "s3://out/j/adapters/ab/MODEL_CARD.md" == done.status["promotion"]["modelCardURI"]
    meta = front_matter(text)
    assert meta["library_name"] == "peft" and meta["license"] == "CC-BY-4.0"
    assert meta["base_model"] == td.ftj({})["spec"]["baseModel"]["uri"] and "finetune-operator" in meta["tags"]
    assert td.DIGEST in text and "## Evaluation and governance" in text and "## Lineage" in text
    assert done.status["governance"]["signingKey"] in text  # which platform key vouched for it
    # The same reconcile again writes nothing (the card is recorded in status).
    again = decisions.plan_finetunejob(td.ftj(done.status), decisions.JobInputs(
        dataset=td.ready_dataset(), governance_job=td.job(done.status["governanceJob"], complete=True),
        keys=td.KEYS, report=td.signed_report([]), manifest_ok=(True, "ok")), td.CFG, td.NOW)
    assert again.model_card is None


def test_hostile_provenance_cannot_add_front_matter_or_markup():
    origin = "x\n---\nlicense: MIT\n---\n<script>alert(1)</script> | col | [link](javascript:1) " + "A" * 5000
    done = promoted(origin=origin, license="proprietary\nbase_model: evil")
    _, text = done.model_card
    meta = front_matter(text)
    assert meta["license"] == "proprietary\nbase_model: evil" and "evil" not in str(meta["base_model"])
    assert text.count("\n---\n") == 1 and "<script>" not in text and "\\<script\\>" in text
    assert "license: MIT" not in text.split("\n---\n", 1)[1].split("## Training data")[0].splitlines()[0]
    assert re.search(r"… \d{4} more", text)  # cut, and says so
    row = next(line for line in text.splitlines() if line.startswith("| Origin |"))
    assert row.count(" | ") == 1  # the value's own pipes are escaped: still two cells


def test_render_never_needs_a_dataset():
    ftj = td.ftj({"adapter": {"uri": "s3://a", "digest": td.DIGEST}})
    text = modelcard.render(ftj, ftj["status"], None, [], "prod", td.NOW)
    assert front_matter(text)["license"] == "other" and "prod" in text


def test_a_continual_adapter_lists_the_adapters_it_continues():
    chain = [{"digest": "sha256:" + "1" * 64, "datasetDigest": "sha256:" + "d" * 64},
             {"digest": "sha256:" + "2" * 64, "datasetURI": "s3://data/first|evil"}]
    ftj = td.ftj({"adapter": {"uri": "s3://a", "digest": td.DIGEST},
                  "lineage": {"parentDigest": chain[0]["digest"], "parentURI": "s3://p", "source": "alias/prod",
                              "depth": 2, "chain": chain}})
    text = modelcard.render(ftj, ftj["status"], None, [], "prod", td.NOW)
    assert "Continues `alias/prod`" in text
    rows = [line for line in text.splitlines() if line.startswith(("| parent |", "| ancestor 2 |"))]
    assert rows[0] == f"| parent | {chain[0]['digest']} | {chain[0]['datasetDigest']} |"
    assert rows[1].startswith(f"| ancestor 2 | {chain[1]['digest']} | s3://data/first") and rows[1].count(" | ") == 2
    plain = modelcard.render(td.ftj({"adapter": {"uri": "s3://a", "digest": td.DIGEST}}), {}, None, [], "p", td.NOW)
    assert "Continues" not in plain
