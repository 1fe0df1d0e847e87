"""SyntheticDataset decisions (synthesis_plan), without a cluster: inputs, runs, Jobs, review, the child Dataset."""

from __future__ import annotations

import copy

import pytest

import gitops_statuses as g
from finetune_operator import synthesis_plan
from finetune_operator.api import validation
from finetune_operator.api.dataset import Dataset
from finetune_operator.api.synthetic import SynthesisConfig, SyntheticDataset
from finetune_operator.conditions import get_condition

PATHS = g.synthetic_paths()


def _run(obj: dict) -> str:
    sd = SyntheticDataset.model_validate(obj)
    inputs, _, _ = synthesis_plan.resolve(sd, g.seed_obj(), g.generator_obj())
    return synthesis_plan.run_digest(sd, inputs)


def test_the_generation_job_runs_synthesize_with_the_resolved_inputs():
    plan = g.plan_synthetic(g.synthetic_obj())
    cm, job = plan.create
    assert (cm["kind"], job["kind"]) == ("ConfigMap", "Job")
    gen_job, _ = g.synthetic_names(g.synthetic_obj())
    assert job["metadata"]["name"] == gen_job == cm["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "finetune-trainer", "synthesize", "--config", "/etc/finetune/synthesis.json"]
    assert job["metadata"]["labels"][synthesis_plan.SYNTHETIC_LABEL] == "syn"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "s-uid"
    cfg = SynthesisConfig.model_validate_json(cm["data"]["synthesis.json"])
    assert cfg.inputs.seedURI == "s3://store/datasets/team-a/seed/1" and cfg.inputs.seedDigest == g.SEED_DIGEST
    assert cfg.inputs.adapterURI == "s3://out/gen/adapters/ab" and cfg.inputs.adapterDigest == g.DIGEST
    assert cfg.inputs.baseModel.uri == "s3://models/tiny" and cfg.inputs.seedLicense == "CC-BY-4.0"
    assert cfg.workURI == f"s3://store/synthetic/team-a/syn/run-{_run(g.synthetic_obj())}"
    # No GPU asked for: the default resources run the generator on CPU, with no GPU toleration.
    assert "nvidia.com/gpu" not in str(job["spec"]["template"]["spec"]["containers"][0]["resources"])
    assert PATHS["generating"]["status"]["job"] == gen_job


def test_a_run_is_named_by_what_changes_the_candidates_only():
    base = _run(g.synthetic_obj())
    assert base == _run(g.synthetic_obj())  # deterministic: a restarted operator adopts the same Job
    # The review threshold and the resulting Dataset's split do not change the candidates: same run,
    # so reviews already made still count.
    assert _run(g.synthetic_obj(review={"minAcceptanceRate": 0.5})) == base
    assert _run(g.synthetic_obj(evaluation={"fraction": 0.2})) == base
    assert _run(g.synthetic_obj(sampling={"seed": 7})) != base
    assert _run(g.synthetic_obj(examples=21)) != base
    sd = SyntheticDataset.model_validate(g.synthetic_obj())
    newer_seed = g.seed_obj()
    newer_seed["status"]["digest"] = "sha256:" + "ee" * 32
    inputs, _, _ = synthesis_plan.resolve(sd, newer_seed, g.generator_obj())
    assert synthesis_plan.run_digest(sd, inputs) != base


@pytest.mark.parametrize("seed,generator,reason", [
    ({}, None, "SeedMissing"),
    (g.seed_obj("Validating"), None, "SeedNotReady"),
    (g.seed_obj("Invalid"), None, "SeedInvalid"),
    (None, {}, "GeneratorMissing"),
    (None, g.generator_obj(promoted=False), "GeneratorNotPromoted"),
])
def test_waiting_for_inputs_says_which_and_why(seed, generator, reason):
    plan = g.plan_synthetic(g.synthetic_obj(), seed=seed, generator=generator)
    assert plan.create == []
    status = plan.status
    assert status["phase"] == "WaitingForInputs"
    cond = get_condition(status["conditions"], "InputsReady")
    assert (cond["status"], cond["reason"]) == ("False", reason)
    assert "'seed'" in status["message"] or "'gen'" in status["message"]


def test_an_image_text_seed_cannot_be_grown_by_a_text_generator():
    seed = g.seed_obj()
    seed["spec"]["format"] = "image-text"
    status = g.plan_synthetic(g.synthetic_obj(), seed=seed).status
    assert get_condition(status["conditions"], "InputsReady")["reason"] == "SeedFormat"
    assert get_condition(status["conditions"], "Stalled")["status"] == "True"


def test_a_base_model_generator_needs_no_fine_tune_job():
    obj = g.synthetic_obj(generator={"baseModel": {"uri": "s3://models/smollm2"}})
    plan = g.plan_synthetic(obj, generator={})
    cfg = SynthesisConfig.model_validate_json(plan.create[0]["data"]["synthesis.json"])
    assert cfg.inputs.adapterURI is None and cfg.inputs.baseModel.uri == "s3://models/smollm2"


def test_review_progress_is_in_status_and_the_threshold_decides():
    reviewing = PATHS["reviewing"]["status"]
    assert reviewing["review"] == {"required": 6, "reviewed": 3, "accepted": 2, "edited": 0, "rejected": 1,
                                   "pending": 3, "acceptanceRate": pytest.approx(2 / 3)}
    pending = get_condition(reviewing["conditions"], "ReviewPending")
    assert pending["status"] == "True" and "3 of 6 sampled candidates await review" in pending["message"]
    assert "ftctl review syn" in reviewing["message"]
    assert reviewing["generation"]["removed"] == {"novelty": 20, "pii": 4}
    low = PATHS["low-acceptance"]["status"]
    assert low["phase"] == "Invalid" and "2 of 6 reviewed accepted" in low["message"]
    assert "33.3% is below minAcceptanceRate 80.0%" in low["message"]
    # A lower threshold lets the same review through (an edit of the spec: same run, same reviews).
    lenient = copy.deepcopy(PATHS["reviewing"])
    lenient["spec"]["review"] = {"minAcceptanceRate": 0.3}
    plan = g.plan_synthetic(lenient, report=g.generation_report(), review=g.review_stats(accepted=2, rejected=4))
    assert plan.status["phase"] == "Finalizing"
    assert [m["kind"] for m in plan.create] == ["ConfigMap", "Job"]
    assert plan.create[1]["spec"]["template"]["spec"]["containers"][0]["command"][1] == "synthesis-finalize"


def test_the_child_dataset_is_a_valid_dataset_with_the_synthetic_chain():
    child = g.synthetic_child(PATHS["finalizing"])
    Dataset.model_validate(child)
    # The API server's rules too (our port of its schema and CEL checks): the operator's create must pass.
    validation.validate_manifest({k: v for k, v in child.items() if k != "status"})
    prov = child["spec"]["provenance"]
    assert prov["license"] == "CC-BY-4.0" and prov["origin"].startswith("synthetic:")
    work = f"s3://store/synthetic/team-a/syn/run-{_run(g.synthetic_obj())}"
    assert prov["synthetic"] == {
        "syntheticDataset": "syn", "seedDataset": "seed", "seedDigest": g.SEED_DIGEST,
        "baseModelDigest": g.BASE_DIGEST, "generatorAdapterDigest": g.DIGEST, "templateDigest": g.TEMPLATE_DIGEST,
        "candidatesDigest": g.CANDIDATES_DIGEST, "reviewURI": f"{work}/review.json"}
    assert child["spec"]["source"]["uri"] == f"{work}/reviewed.jsonl"
    assert child["spec"]["output"]["uri"] == f"{work}/dataset"
    assert child["metadata"]["ownerReferences"][0]["kind"] == "SyntheticDataset"
    assert child["metadata"]["name"] == "syn"


def test_a_dataset_of_that_name_not_ours_is_not_taken_over():
    created = PATHS["dataset-created"]
    theirs = g.synthetic_child(created)
    theirs["metadata"]["ownerReferences"] = []
    plan = g.plan_synthetic(created, report=g.generation_report(), review=g.review_stats(accepted=6),
                            finalized={}, dataset=theirs)
    assert plan.status["phase"] == "Invalid" and plan.patches == [] and plan.create == []
    assert get_condition(plan.status["conditions"], "Ready")["reason"] == "DatasetNameTaken"


def test_the_api_servers_defaults_are_not_an_edit():
    created = PATHS["dataset-created"]
    child = g.synthetic_child(created)
    child["spec"] = validation.validate_manifest({k: v for k, v in child.items() if k != "status"})["spec"]
    assert child["spec"]["source"]["maxBytes"] == "10Gi"  # defaulted, as the real server does
    plan = g.plan_synthetic(created, report=g.generation_report(), review=g.review_stats(accepted=6),
                            finalized={}, dataset=child)
    assert plan.patches == [] and plan.status["phase"] == "Finalizing"


def test_a_child_edited_by_hand_is_put_back():
    created = PATHS["dataset-created"]
    child = g.synthetic_child(created)
    child["spec"]["source"]["uri"] = "s3://elsewhere/other.jsonl"
    plan = g.plan_synthetic(created, report=g.generation_report(), review=g.review_stats(accepted=6),
                            finalized={}, dataset=child)
    ((api, kind, name, patch),) = plan.patches
    assert (kind, name) == ("Dataset", "syn") and patch["spec"]["source"]["uri"].endswith("/reviewed.jsonl")


def test_ready_follows_the_child_dataset():
    assert PATHS["ready"]["status"]["phase"] == "Ready"
    assert get_condition(PATHS["ready"]["status"]["conditions"], "Ready")["status"] == "True"
    assert "6 examples" in PATHS["ready"]["status"]["message"]
    invalid = PATHS["dataset-invalid"]["status"]
    assert invalid["phase"] == "Invalid" and "minExamples is 10" in invalid["message"]


def test_reconciles_are_idempotent():
    gen_job, fin_job = g.synthetic_names(g.synthetic_obj())
    reviewed = g.review_stats(accepted=6)
    cases = {"generating": {"jobs": {gen_job: g.job(gen_job, active=1)}},
             "reviewing": {"report": g.generation_report(), "review": g.review_stats(accepted=2, rejected=1)},
             "finalizing": {"report": g.generation_report(), "review": reviewed,
                            "jobs": {fin_job: g.job(fin_job, active=1)}},
             "ready": {"report": g.generation_report(), "review": reviewed, "finalized": {},
                       "dataset": {**g.synthetic_child(PATHS["dataset-created"]),
                                   "status": {"phase": "Ready", "observedGeneration": 1}}}}
    for name, observed in cases.items():
        once = g.step(PATHS[name], g.plan_synthetic(PATHS[name], now=g.T2, **observed))
        again = g.plan_synthetic(once, now=g.T3, **observed)
        assert again.status is None and again.events == [] and again.create == [], name


def test_generation_failure_names_the_job():
    failed = PATHS["generation-failed"]["status"]
    gen_job, _ = g.synthetic_names(g.synthetic_obj())
    assert failed["phase"] == "Failed" and gen_job in failed["message"]
