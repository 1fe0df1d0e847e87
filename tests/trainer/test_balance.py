"""training.balance: group labels (metadata field, word rules, default), deterministic re-sampling
to equal or given weights, the counts, and what the operator copies into the job's status."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from finetune_operator import curation_status, decisions
from finetune_operator.api.balance import BalanceSettings
from finetune_operator.config import OperatorConfig
from finetune_trainer.balance import Labeler, rebalance
from finetune_trainer.errors import ConfigError
from finetune_trainer.formats import parse_line


def example(prompt: str, answer: str = "ok", **metadata):
    record = {"instruction": prompt, "output": answer, **({"metadata": metadata} if metadata else {})}
    return parse_line(json.dumps(record), "instruction")


def settings(**kw) -> BalanceSettings:
    return BalanceSettings.model_validate(kw)


def skewed(n_a: int = 30, n_b: int = 6, n_c: int = 0):
    return ([example(f"a {i}", group="a") for i in range(n_a)] + [example(f"b {i}", group="b") for i in range(n_b)]
            + [example(f"c {i}") for i in range(n_c)])


def test_labels_come_from_the_metadata_field_then_the_rules_then_the_default():
    label = Labeler(settings(metadataField="group", rules=[
        {"group": "women", "anyOf": ["woman", "she", "her"]},
        {"group": "men", "anyOf": ["man", "he"], "text": "prompt"},
        {"group": "tricky", "anyOf": ["a.b (c"], "text": "answer"}]))
    assert label(example("anything", group="explicit")) == "explicit"
    assert label(example("The WOMAN asked")) == "women"
    assert label(example("A manager asked")) == "other"  # whole words only: "man" is not in "manager"
    assert label(example("Then   he   left")) == "men"
    assert label(example("x", "see a.b (c here")) == "tricky"  # the words are text, never a pattern
    assert label(example("x", "see aXb (c here")) == "other"
    assert label(example("numbers", group=3)) == "3" and label(example("flags", group=True)) == "true"


def test_equal_shares_keep_the_size_and_repeat_the_small_group():
    examples = skewed()
    out, report = rebalance(examples, settings(metadataField="group"), seed=1)
    assert len(out) == len(examples) == report.before == report.after
    counts = Counter(ex.metadata["group"] for ex in out)
    assert counts == {"a": 18, "b": 18}
    b_times = Counter(ex.messages[0][1] for ex in out if ex.metadata["group"] == "b")
    assert set(b_times.values()) == {3}  # each of the 6 three times: no example left out
    a_seen = Counter(ex.messages[0][1] for ex in out if ex.metadata["group"] == "a")
    assert max(a_seen.values()) == 1  # a larger group is drawn without replacement
    assert {g.name: (g.before, g.after) for g in report.groups} == {"a": (30, 18), "b": (6, 18)}


def test_weights_set_the_shares_and_zero_leaves_a_group_out():
    examples = skewed(30, 6, 4)
    out, report = rebalance(examples, settings(metadataField="group", weights={"a": 2, "b": 1, "other": 0}), seed=1)
    assert Counter(ex.metadata["group"] if ex.metadata else "other" for ex in out) == {"a": 27, "b": 13}
    assert {g.name: g.after for g in report.groups} == {"a": 27, "b": 13, "other": 0}
    with pytest.raises(ConfigError, match="training.balance.weights"):
        rebalance(skewed(3, 0), settings(metadataField="group", weights={"a": 0}), seed=1)


def test_the_sample_is_deterministic_and_follows_the_seed():
    examples = skewed(40, 7)
    draw = lambda seed: [ex.messages[0][1] for ex in rebalance(examples, settings(metadataField="group"), seed)[0]]  # noqa: E731
    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    explicit = settings(metadataField="group", seed=5)
    assert [ex.messages[0][1] for ex in rebalance(examples, explicit, seed=999)[0]] == draw(5)


def test_without_settings_nothing_changes_and_too_many_groups_is_a_config_error():
    examples = skewed()
    out, report = rebalance(examples, None, seed=1)
    assert out == examples and report is None
    many = [example(f"p {i}", group=f"g{i}") for i in range(65)]
    with pytest.raises(ConfigError, match="65 groups, at most 64"):
        rebalance(many, settings(metadataField="group"), seed=1)
    with pytest.raises(ConfigError, match="longer than 63 characters"):
        rebalance([example("p", group="g" * 500)], settings(metadataField="group"), seed=1)


def test_the_api_needs_a_way_to_label():
    from finetune_operator.api.validation import validate_manifest

    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns"},
           "spec": {"baseModel": {"uri": "s3://models/tiny"}, "datasetRef": {"name": "ds"},
                    "output": {"uri": "s3://outputs/j"}, "training": {"maxSteps": 5, "balance": {"weights": {"a": 2}}}}}
    with pytest.raises(ValueError, match="needs metadataField or rules"):
        validate_manifest(job)
    job["spec"]["training"]["balance"]["metadataField"] = "group"
    assert validate_manifest(job)["spec"]["training"]["balance"]["defaultGroup"] == "other"
    with pytest.raises(ValueError):
        BalanceSettings.model_validate({"metadataField": "g", "weights": {"a": -1}})


def test_the_job_status_gets_bounded_counts_from_result_json():
    hostile = {"before": 10, "after": "many", "seed": -1,
               "groups": [{"name": "x" * 10_000, "before": 1, "after": 2, "weight": "heavy"}] * 500}
    status = curation_status.balance_status(hostile)
    assert len(status["groups"]) == 64 and len(status["groups"][0]["name"]) <= 128
    assert status["after"] == 0 and status["seed"] == 0 and status["groups"][0]["weight"] == 1.0
    assert curation_status.balance_status(None) is None and curation_status.balance_status([1]) is None

    result = {"adapterURI": "s3://out/j/adapters/ab", "digest": "sha256:" + "a" * 64, "sizeBytes": 10,
              "balance": {"before": 36, "after": 36, "seed": 1,
                          "groups": [{"name": "a", "before": 30, "after": 18, "weight": 1.0},
                                     {"name": "b", "before": 6, "after": 18, "weight": 1.0}]}}
    ftj = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "j", "namespace": "ns", "uid": "j-uid", "generation": 1},
           "spec": {"baseModel": {"uri": "s3://m/tiny"}, "datasetRef": {"name": "ds"}, "output": {"uri": "s3://out/j"},
                    "resources": {"gpusPerNode": 1}},
           "status": {"phase": "Training", "trainerJob": "j-train-1", "observedGeneration": 1, "conditions": []}}
    dataset = {"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
               "metadata": {"name": "ds", "namespace": "ns", "uid": "d-uid", "generation": 1},
               "spec": {"source": {"uri": "s3://b/raw.jsonl"}, "format": "chat"},
               "status": {"phase": "Ready", "observedGeneration": 1, "digest": "sha256:" + "1" * 64,
                          "validatedURI": "s3://store/datasets/ns/ds/1"}}
    trainer = decisions.summarize_job({"metadata": {"name": "j-train-1"},
                                       "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    config = OperatorConfig(artifact_store="s3://store", default_governance={"required": []})
    plan = decisions.plan_finetunejob(ftj, decisions.JobInputs(dataset=dataset, trainer_job=trainer, result=result),
                                      config, "2026-01-01T00:10:00Z")
    assert plan.status["adapter"]["digest"] == result["digest"]
    assert plan.status["balance"] == result["balance"]
