"""The retention check on two sequential tasks on the tiny model (docs/continual.md, "The two-task example").

Task A (a skill in a fixed answer style): "What is 3 plus 4?" -> "3 plus 4 is 7.". Task B (new
facts): "Where did Kim travel in week 12?" -> "In week 12 Kim went to Lima.". B is trained from the
promoted A adapter (spec.initFrom) with the real trainer, then judged by the real governance
command: without replay B forgets A (the retention check fails and promotion is blocked); with
20% or 30% of each epoch replayed from A's Dataset it retains A and is promoted. ~15 s on one thread.
"""

from __future__ import annotations

import json

import pytest

from finetune_operator.governance import ReportBinding, effective_policy, policy_digest, promotion_decision, read_report
from finetune_trainer import storage

from . import helpers as h

CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Lima", "Dakar", "Perth", "Riga"]
#: Continual runs learn the new task more gently than the first one (docs/continual.md).
CHILD_TRAINING = {"maxSteps": 60, "learningRate": 1e-3}


def fact_records(n: int = 80) -> list[dict]:
    """Facts the base model and adapter A cannot know: who travelled where, week by week."""
    return [{"instruction": f"Where did {h.NAMES[i % 10]} travel in week {i}?",
             "output": f"In week {i} {h.NAMES[i % 10]} went to {CITIES[(i * 3 + i // 10) % 8]}."} for i in range(n)]


def dataset(root: str, name: str, records: list[dict]) -> dict:
    source = storage.join(root, f"{name}.jsonl")
    h.write_jsonl(source, records)
    spec = h.dataset_spec(source)
    uri = storage.join(root, f"{name}-data")
    return {"spec": spec, "uri": uri, "digest": h.validate_into(spec, uri).digest}


POLICY = {"required": ["evaluation", "retention"]}


@pytest.fixture(scope="module")
def tasks(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retention")
    root = f"file://{tmp}"
    a, b = dataset(root, "a", h.arithmetic_records()), dataset(root, "b", fact_records())
    cfg_a = h.job_config(f"{root}/A", tiny_model_dir, a["spec"], a["uri"], a["digest"], governance=POLICY, name="a")
    return {"tmp": tmp, "root": root, "model": tiny_model_dir, "a": a, "b": b, "A": h.train(cfg_a, tmp / "a.json")}


def child(tasks, name: str, replay: float | None = None, parent: dict | None = None, governance=None):
    """Train B from A (optionally with replay of A) and judge it; returns (config, result, report envelope)."""
    b, parent = tasks["b"], parent or tasks["A"]
    training = dict(CHILD_TRAINING)
    extra: dict = {"initFrom": {"uri": parent["adapterURI"], "digest": parent["digest"], "source": "fineTuneJob/a"}}
    if replay:
        training["replay"] = {"datasets": ["a"], "fraction": replay}
        extra["replayData"] = [{"name": "a", "uri": tasks["a"]["uri"], "format": "instruction",
                                "digest": tasks["a"]["digest"]}]
    cfg = h.job_config(f"{tasks['root']}/{name}", tasks["model"], b["spec"], b["uri"], b["digest"],
                       governance=governance or POLICY, name=name, training=training)
    cfg = type(cfg).model_validate({**cfg.model_dump(mode="json"), **extra})
    result = h.train(cfg, tasks["tmp"] / f"{name}.json")
    h.governance(cfg, tasks["tmp"] / f"{name}-gov.json", result["adapterURI"])
    envelope = json.loads(storage.read_text(storage.join(result["adapterURI"], "governance.json")))
    return cfg, result, envelope


def decide(cfg, result, envelope):
    bound = ReportBinding(adapter_digest=result["digest"], policy_digest=policy_digest(cfg.governance.model_dump()),
                          run=1, dataset_digest=cfg.data.digest)
    outcome = read_report(envelope, bound, h.KEYS)
    return outcome, promotion_decision(outcome, {"mode": "auto"}, result["digest"], manifest_ok=True)


def test_without_replay_b_forgets_a_and_is_blocked(tasks):
    cfg, result, envelope = child(tasks, "b-alone")
    checks = h.checks(h.verified_predicate(envelope))
    assert checks["evaluation"]["passed"], checks["evaluation"]["message"]  # it did learn task B
    retention = checks["retention"]
    assert not retention["passed"] and retention["value"] > 1.0  # A's held-out loss more than doubled
    assert "forgets earlier tasks" in retention["message"] and "a-data/eval.jsonl" in retention["message"]
    report = json.loads(storage.read_text(retention["reportURI"]))
    (task,) = report["tasks"]
    assert task["baseLoss"] > task["parentLoss"] and task["newLoss"] > task["parentLoss"] * 2
    outcome, decision = decide(cfg, result, envelope)
    assert outcome.failing == ["retention"]
    assert decision.state == "Blocked" and decision.reason == "GovernanceFailed" and not decision.promote


@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_with_replay_b_retains_a_and_is_promoted(tasks, fraction):
    cfg, result, envelope = child(tasks, f"b-replay-{fraction}", replay=fraction)
    assert result["metrics"]["replay"]["examplesPerEpoch"] > 0
    checks = h.checks(h.verified_predicate(envelope))
    assert all(c["passed"] for c in checks.values()), {n: c["message"] for n, c in checks.items()}
    retention = checks["retention"]
    assert retention["value"] <= 0.05 and "base " in retention["message"] and "/ parent " in retention["message"]
    (task,) = json.loads(storage.read_text(retention["reportURI"]))["tasks"]
    assert task["newLoss"] < task["baseLoss"] and task["newLoss"] <= task["parentLoss"] * 1.05
    assert decide(cfg, result, envelope)[1].promote


def test_a_policy_can_name_the_tasks_and_tighten_the_threshold(tasks):
    # A stricter policy than any replayed run meets: 0.2% forgetting at most, on A's eval split named explicitly.
    strict, _ = effective_policy([{"metadata": {"name": "p"}, "spec": {
        **POLICY, "retention": {"maxForgetting": 0.002, "evalSetURIs": [storage.join(tasks["a"]["uri"], "eval.jsonl")]}}}],
        "team", {"retention": {"maxForgetting": 0.5}})  # a job cannot loosen it
    assert strict.retention.maxForgetting == 0.002
    _, _, envelope = child(tasks, "b-strict", replay=0.2, governance=strict.model_dump(mode="json"))
    retention = h.checks(h.verified_predicate(envelope))["retention"]
    assert not retention["passed"] and retention["threshold"] == 0.002
    assert "a-data/eval.jsonl: loss" in retention["message"] and "maxForgetting 0.2%" in retention["message"]


def test_an_adapter_not_trained_from_the_named_parent_fails(tasks):
    # Judged as if it were its own parent: its manifest names A, so the check refuses to compare.
    cfg, result, _ = child(tasks, "b-once", replay=0.2)
    named = {**cfg.initFrom.model_dump(mode="json"), "uri": result["adapterURI"], "digest": result["digest"]}
    wrong = type(cfg).model_validate({**cfg.model_dump(mode="json"), "initFrom": named})
    report = h.governance(wrong, tasks["tmp"] / "wrong.json", result["adapterURI"])
    retention = h.checks(report)["retention"]
    assert not retention["passed"] and "it was not trained from that parent" in retention["message"]


def test_a_job_without_init_from_has_nothing_to_retain(tasks):
    a = tasks["a"]
    cfg = h.job_config(f"{tasks['root']}/A", tasks["model"], a["spec"], a["uri"], a["digest"],
                       governance={"required": ["retention"]}, name="a")
    retention = h.checks(h.governance(cfg, tasks["tmp"] / "a-gov.json", tasks["A"]["adapterURI"]))["retention"]
    assert retention["passed"] and "not a continual job" in retention["message"]
