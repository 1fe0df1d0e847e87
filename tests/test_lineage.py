"""Continual decisions without a cluster: resolving spec.initFrom, replay Datasets, lineage, the plan."""

from __future__ import annotations

import copy

import pytest

from finetune_operator import decisions, lineage
from finetune_operator.api.finetunejob import FineTuneJob
from finetune_operator.config import OperatorConfig
from finetune_operator.conditions import get_condition

D1, D2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def job(name="child", init=None, replay=None, status=None) -> dict:
    spec = {"baseModel": {"uri": "s3://models/tiny"}, "datasetRef": {"name": "new"},
            "output": {"uri": "s3://bucket/runs/child"}, "training": {}}
    if init is not None:
        spec["initFrom"] = init
    if replay is not None:
        spec["training"]["replay"] = replay
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    if status is not None:
        body["status"] = status
    return body


def typed(body: dict) -> FineTuneJob:
    found = lineage.typed_job(body)
    assert found is not None
    return found


PROMOTED = {"phase": "Succeeded", "adapter": {"uri": "s3://bucket/runs/a/adapters/" + "a" * 64, "digest": D1},
            "promotion": {"state": "Promoted", "alias": "a"}}


def test_a_fine_tune_job_parent_is_its_promoted_adapter_and_waits_until_then():
    spec = typed(job(init={"fineTuneJob": {"name": "a"}})).spec
    assert lineage.resolve_init_from(spec, None).state == "Waiting"
    running = typed(job("a", status={"phase": "Training"}))
    waiting = lineage.resolve_init_from(spec, running)
    assert waiting.state == "Waiting" and "phase Training" in waiting.message
    blocked = typed(job("a", status={**PROMOTED, "phase": "Failed", "promotion": {"state": "Blocked"}}))
    assert lineage.resolve_init_from(spec, blocked).state == "Waiting"
    done = lineage.resolve_init_from(spec, typed(job("a", status=PROMOTED)))
    assert done.state == "Resolved" and done.parent.digest == D1 and done.parent.source == "fineTuneJob/a"


def test_an_alias_parent_is_read_from_its_record_which_is_not_trusted():
    spec = typed(job(init={"alias": {"name": "support"}})).spec
    assert lineage.alias_location(spec) == "s3://bucket/runs/child/aliases/support.json"
    elsewhere = typed(job(init={"alias": {"name": "support", "outputURI": "s3://other/runs/"}})).spec
    assert lineage.alias_location(elsewhere) == "s3://other/runs/aliases/support.json"
    assert lineage.resolve_init_from(spec, alias_record=None).state == "Waiting"
    for hostile in (["x"], {"adapterURI": "http://evil", "adapterDigest": D1}, {"adapterURI": "s3://bkt/a"}):
        res = lineage.resolve_init_from(spec, alias_record=hostile)
        assert res.state == "Invalid" and res.message.startswith("spec.initFrom.alias"), hostile
    res = lineage.resolve_init_from(spec, alias_record={"adapterURI": "s3://bkt/x", "adapterDigest": D2})
    assert res.state == "Resolved" and res.parent.uri == "s3://bkt/x" and res.parent.source == "alias/support"


def test_an_adapter_uri_parent_names_its_digest():
    spec = typed(job(init={"adapter": {"uri": "s3://bkt/x", "digest": D2}, "l2": 0.5})).spec
    res = lineage.resolve_init_from(spec)
    assert res.state == "Resolved" and (res.parent.digest, res.parent.l2) == (D2, 0.5)


PARENT_MANIFEST = {"files": {}, "dataset": {"uri": "s3://bkt/data/a", "digest": "sha256:" + "d" * 64, "format": "chat"},
                   "lineage": {"chain": [{"digest": D2, "uri": "s3://bkt/root", "datasetURI": "s3://bkt/data/root"}]}}


def test_the_chain_is_the_parent_then_its_own_chain():
    chain = lineage.chain_of("s3://bkt/x", D1, PARENT_MANIFEST)
    assert [e["digest"] for e in chain] == [D1, D2]
    assert chain[0]["datasetURI"] == "s3://bkt/data/a" and chain[1]["datasetURI"] == "s3://bkt/data/root"
    with pytest.raises(ValueError, match="spec.initFrom: the parent's manifest has a malformed lineage.chain"):
        lineage.chain_of("s3://bkt/x", D1, {**PARENT_MANIFEST, "lineage": {"chain": [{"no": "digest"}]}})
    deep = {**PARENT_MANIFEST, "lineage": {"chain": [{"digest": D2}] * 40}}
    with pytest.raises(ValueError, match="at most 31 are supported"):
        lineage.chain_of("s3://bkt/x", D1, deep)


def ready_dataset(name: str, phase: str = "Ready") -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": name, "namespace": "team", "generation": 1},
            "spec": {"source": {"uri": f"s3://bkt/raw/{name}.jsonl"}, "format": "chat",
                     "provenance": {"origin": "tests", "license": "CC0-1.0"}},
            "status": {"phase": phase, "observedGeneration": 1, "validatedURI": f"s3://bkt/data/{name}",
                       "digest": "sha256:" + "e" * 64}}


def inputs(**kw) -> decisions.JobInputs:
    return decisions.JobInputs(dataset=ready_dataset("new"), **kw)


def test_the_trainer_starts_only_once_the_parent_verifies_and_gets_its_lineage():
    ftj = job(init={"adapter": {"uri": "s3://bkt/x", "digest": D1}}, replay={"datasets": ["old"], "fraction": 0.25})
    cont = lineage.ContinualInputs(resolution=lineage.resolve_init_from(typed(ftj).spec), manifest=PARENT_MANIFEST,
                                   manifest_digest=D1, verified=(True, "ok"),
                                   replay_datasets={"old": lineage.typed_dataset(ready_dataset("old", "Validating"))})
    plan = decisions.plan_finetunejob(ftj, inputs(continual=cont), OperatorConfig(), "2026-01-01T00:00:00Z")
    assert plan.create == [] and plan.status["phase"] == "WaitingForDataset"
    assert "training.replay: Dataset old is Validating" in plan.status["message"]

    cont.replay_datasets["old"] = lineage.typed_dataset(ready_dataset("old"))
    plan = decisions.plan_finetunejob(ftj, inputs(continual=cont), OperatorConfig(), "2026-01-01T00:00:00Z")
    status = plan.status
    assert status["phase"] == "Queued" and status["lineage"]["parentDigest"] == D1
    assert [e["digest"] for e in status["lineage"]["chain"]] == [D1, D2] and status["lineage"]["depth"] == 2
    assert get_condition(status["conditions"], "ParentReady")["status"] == "True"
    import json

    cfg = json.loads(next(m for m in plan.create if m["kind"] == "ConfigMap")["data"]["job.json"])
    assert cfg["initFrom"] == {"uri": "s3://bkt/x", "digest": D1, "source": "adapter", "l2": 0.0}
    assert cfg["replayData"] == [{"name": "old", "uri": "s3://bkt/data/old", "format": "chat",
                                  "digest": "sha256:" + "e" * 64}]

    # After a restart status.lineage is the parent: nothing is resolved again.
    again = copy.deepcopy(ftj) | {"status": {**status, "trainerJob": None}}
    plan2 = decisions.plan_finetunejob(again, inputs(continual=lineage.ContinualInputs(
        replay_datasets=cont.replay_datasets)), OperatorConfig(), "2026-01-01T00:00:00Z")
    assert json.loads(next(m for m in plan2.create if m["kind"] == "ConfigMap")["data"]["job.json"])["initFrom"] \
        == cfg["initFrom"]


@pytest.mark.parametrize("observed, says", [
    (dict(manifest_digest=D2, verified=(True, "ok")), "has digest " + D2),
    (dict(manifest_digest=D1, verified=(False, "s3://bkt/x/adapter_model.safetensors: sha256 does not match")),
     "does not verify"),
    (dict(manifest_digest=None, verified=(False, "s3://bkt/x/manifest.json: missing")), "missing"),
])
def test_a_tampered_parent_fails_the_job_before_any_trainer_job(observed, says):
    ftj = job(init={"adapter": {"uri": "s3://bkt/x", "digest": D1}})
    cont = lineage.ContinualInputs(resolution=lineage.resolve_init_from(typed(ftj).spec), manifest=PARENT_MANIFEST,
                                   **observed)
    plan = decisions.plan_finetunejob(ftj, inputs(continual=cont), OperatorConfig(), "2026-01-01T00:00:00Z")
    assert plan.create == [] and plan.status["phase"] == "Failed"
    failed = get_condition(plan.status["conditions"], "Failed")
    assert failed["reason"] == "InitFromInvalid" and failed["message"].startswith("spec.initFrom (adapter)")
    assert says in failed["message"]
    assert ("Warning", "InitFromInvalid", failed["message"]) in plan.events


def test_waiting_for_the_parent_keeps_the_job_pending():
    ftj = job(init={"fineTuneJob": {"name": "a"}})
    cont = lineage.ContinualInputs(resolution=lineage.resolve_init_from(typed(ftj).spec, None))
    plan = decisions.plan_finetunejob(ftj, inputs(continual=cont), OperatorConfig(), "2026-01-01T00:00:00Z")
    assert plan.create == [] and plan.status["phase"] == "Pending"
    assert get_condition(plan.status["conditions"], "ParentReady")["reason"] == "WaitingForParent"


def test_retention_is_required_for_a_continual_job_only():
    policy, _ = decisions.effective_policy(job(init={"adapter": {"uri": "s3://bkt/x", "digest": D1}}), [],
                                           OperatorConfig())
    assert "retention" in policy["required"] and policy["retention"]["maxForgetting"] == 0.05
    plain, _ = decisions.effective_policy(job(), [], OperatorConfig())
    assert "retention" not in plain["required"]


def test_init_from_names_exactly_one_parent_as_the_api_server_checks_it():
    from finetune_operator.api.validation import ManifestError, validate_manifest

    def errors(init) -> list[str]:
        try:
            validate_manifest(job(init=init))
        except ManifestError as exc:
            return exc.errors
        return []

    assert errors({"alias": {"name": "support"}}) == []
    for wrong in ({}, {"l2": 1.0}, {"alias": {"name": "a"}, "adapter": {"uri": "s3://bkt/x", "digest": D1}}):
        assert any(e.startswith("spec.initFrom") and "exactly one of" in e for e in errors(wrong)), wrong


def test_ftctl_run_refuses_a_continual_job_instead_of_training_from_the_base_model(tmp_path):
    from rich.console import Console

    from finetune_operator.ftctl.errors import EXIT_USAGE, FtctlError
    from finetune_operator.ftctl.local import RunOptions, run_all
    from finetune_operator.ftctl.manifests import ManifestSet

    manifests = ManifestSet(datasets=[], jobs=[job(init={"alias": {"name": "support"}})], policies=[])
    with pytest.raises(FtctlError) as exc:
        run_all(manifests, RunOptions(cwd=tmp_path), Console(), reporter=None)
    assert exc.value.exit_code == EXIT_USAGE and "spec.initFrom and training.replay" in str(exc.value)


def test_a_continual_job_is_never_judged_without_its_parent():
    # status.lineage gone (e.g. the status was rewritten): no governance Job that would find "nothing to retain".
    status = {"phase": "Evaluating", "adapter": {"uri": "s3://bkt/runs/child/adapters/" + "c" * 64, "digest": D2},
              "datasetDigest": "sha256:" + "e" * 64}
    ftj = job(init={"adapter": {"uri": "s3://bkt/x", "digest": D1}}, status=status)
    plan = decisions.plan_finetunejob(ftj, inputs(), OperatorConfig(), "2026-01-01T00:00:00Z")
    assert plan.create == [] and plan.status["phase"] == "Failed"
    assert get_condition(plan.status["conditions"], "Failed")["reason"] == "LineageMissing"


def test_a_lost_trainer_job_is_not_recreated_without_its_replay_data():
    lineage_status = {"parentDigest": D1, "parentURI": "s3://bkt/x", "source": "adapter", "depth": 1,
                      "chain": [{"digest": D1}]}
    ftj = job(init={"adapter": {"uri": "s3://bkt/x", "digest": D1}}, replay={"datasets": ["old"]},
              status={"phase": "Training", "trainerJob": "child-train-1", "lineage": lineage_status})
    gone = decisions.JobInputs(dataset=ready_dataset("new"), continual=lineage.ContinualInputs(
        replay_datasets={"old": None}))
    assert decisions.plan_finetunejob(ftj, gone, OperatorConfig(), "2026-01-01T00:00:00Z").create == []
    back = decisions.JobInputs(dataset=ready_dataset("new"), continual=lineage.ContinualInputs(
        replay_datasets={"old": lineage.typed_dataset(ready_dataset("old"))}))
    plan = decisions.plan_finetunejob(ftj, back, OperatorConfig(), "2026-01-01T00:00:00Z")
    import json

    cfg = json.loads(next(m for m in plan.create if m["kind"] == "ConfigMap")["data"]["job.json"])
    assert cfg["initFrom"]["digest"] == D1 and cfg["replayData"][0]["name"] == "old"


def test_a_hostile_chain_is_bounded_before_it_reaches_status():
    below = [{"digest": D2, "uri": "s3://bkt/" + "u" * 5000, "datasetDigest": "not-a-digest", "extra": "x" * 9999}]
    chain = lineage.chain_of("s3://bkt/x", D1, {**PARENT_MANIFEST, "lineage": {"chain": below}})
    assert chain[1] == {"digest": D2, "uri": ("s3://bkt/" + "u" * 5000)[:2048]}
    with pytest.raises(ValueError, match="malformed lineage.chain"):
        lineage.chain_of("s3://bkt/x", D1, {**PARENT_MANIFEST, "lineage": {"chain": [{"digest": "x" * 5000}]}})
