"""`finetune-trainer synthesize` end to end with the tiny model and S3 (moto): determinism, written-once
work files, digests checked, config errors that name the field, the generator's adapter, the judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from finetune_trainer import storage
from finetune_trainer.errors import ConfigError
from finetune_trainer.synthesis import command, records
from finetune_trainer.synthesis.filters import CandidateFilter

from .helpers import run_trainer, trainer_config, upload_folder, write_config, write_dataset
from .synthesis_helpers import read_json, save, synthesis_config, write_seed


@pytest.fixture(scope="module")
def world(s3_server, tiny_model_dir):
    """A bucket with the quickstart's validated seed set and the tiny model."""
    name = f"syn-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=name)
    root = f"s3://{name}"
    digest = write_seed(f"{root}/seed")
    model_digest = upload_folder(tiny_model_dir, f"{root}/model")
    return {"root": root, "seed_uri": f"{root}/seed", "seed_digest": digest, "model_uri": f"{root}/model",
            "model_digest": model_digest}


def config(world, work: str, **kwargs):
    return synthesis_config(seed_uri=world["seed_uri"], seed_digest=world["seed_digest"],
                            model_uri=kwargs.pop("model_uri", world["model_uri"]),
                            model_digest=kwargs.pop("model_digest", world["model_digest"]),
                            work_uri=f"{world['root']}/{work}", **kwargs)


def test_same_inputs_and_seed_give_the_same_files_and_a_rerun_does_nothing(world, tmp_path):
    first, second = config(world, "work-a"), config(world, "work-b")
    assert command.run(save(first, tmp_path / "a.json")) == 0
    assert command.run(save(second, tmp_path / "b.json")) == 0
    a, b = (read_json(storage.join(c.workURI, records.GENERATION)) for c in (first, second))
    assert a == b
    assert a["requested"] == 4 and a["generated"] == 16  # examples x maxAttempts: the tiny model writes gibberish
    assert a["removed"]["unparseable"] == 16 - a["kept"]
    assert len(a["examplesRemoved"]["unparseable"]) == 5
    assert a["lineage"]["seedDigest"] == world["seed_digest"]
    assert a["lineage"]["baseModelDigest"] == world["model_digest"]
    assert a["lineage"]["templateDigest"].startswith("sha256:") and a["lineage"]["generatorAdapterDigest"] is None
    data = storage.read_bytes(storage.join(first.workURI, records.CANDIDATES))
    assert a["candidatesDigest"] == records.sha256_digest(data)
    # another sampling seed samples other outputs
    other = config(world, "work-c", spec={"sampling": {"maxNewTokens": 24, "seed": 6}})
    command.run(save(other, tmp_path / "c.json"))
    assert read_json(storage.join(other.workURI, records.GENERATION))["examplesRemoved"] != a["examplesRemoved"]
    # complete work folder: nothing is loaded or written again (a missing model would fail otherwise)
    before = storage.s3_client().head_object(Bucket=world["root"][5:], Key="work-a/generation.json")["ETag"]
    missing_model = config(world, "work-a", model_uri=f"{world['root']}/no-such-model", model_digest=None)
    assert command.run(save(missing_model, tmp_path / "again.json")) == 0
    assert storage.s3_client().head_object(Bucket=world["root"][5:], Key="work-a/generation.json")["ETag"] == before


def test_a_work_folder_of_other_inputs_is_refused(world, tmp_path):
    command.run(save(config(world, "work-d"), tmp_path / "d.json"))
    changed = config(world, "work-d", spec={"examples": 5, "sampling": {"maxNewTokens": 24, "seed": 5}})
    with pytest.raises(ConfigError, match="workURI .* holds a generation of other inputs"):
        command.run(save(changed, tmp_path / "d2.json"))


def test_seed_data_changed_after_validation_is_refused(world, tmp_path):
    wrong = config(world, "work-e").model_copy(deep=True)
    wrong.inputs.seedDigest = "sha256:" + "0" * 64
    with pytest.raises(ConfigError, match=r"^inputs.seedDigest: the seed data at .* has digest sha256:"):
        command.run(save(wrong, tmp_path / "e.json"))
    assert not storage.exists(storage.join(wrong.workURI, records.GENERATION))


def test_a_wrong_base_model_digest_is_refused(world, tmp_path):
    with pytest.raises(ConfigError, match="baseModel.digest mismatch"):
        command.run(save(config(world, "work-f", model_digest="sha256:" + "1" * 64), tmp_path / "f.json"))


@pytest.mark.parametrize("template, says", [
    ("Write another example.", "must contain {examples}"),
    ("{examples}\nTopic: {topic}\nInstruction:", "unknown placeholder {topic}"),
])
def test_a_bad_template_is_a_config_error_naming_the_field(world, tmp_path, template, says):
    cfg = config(world, "work-g", spec={"selfInstruct": {"template": template}})
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "synthesize", "--config",
                           save(cfg, tmp_path / "g.json")],
                          env={**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "term")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = (tmp_path / "term").read_text()
    assert message.startswith("spec.selfInstruct.template:") and says in message
    assert "Traceback" not in proc.stderr


def test_the_generator_adapter_is_verified_and_in_the_lineage(world, tiny_model_dir, tmp_path):
    data = write_dataset(f"{world['root']}/adapter-data", fmt="instruction", n_train=16, n_eval=4)
    cfg = trainer_config(model_uri=world["model_uri"], data_uri=data, output_uri=f"{world['root']}/adapter-out",
                         fmt="instruction", training={"maxSteps": 2})
    proc = run_trainer(write_config(cfg, tmp_path / "train.json"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_json(f"{world['root']}/adapter-out/result.json")
    adapted = config(world, "work-h", adapter_uri=result["adapterURI"], adapter_digest=result["digest"])
    assert command.run(save(adapted, tmp_path / "h.json")) == 0
    lineage = read_json(storage.join(adapted.workURI, records.GENERATION))["lineage"]
    assert lineage["generatorAdapterDigest"] == result["digest"]
    assert lineage["baseModelDigest"] == world["model_digest"]
    wrong = config(world, "work-i", adapter_uri=result["adapterURI"], adapter_digest="sha256:" + "2" * 64)
    with pytest.raises(ConfigError, match=r"^inputs.adapterURI: .* is not the expected sha256:2222"):
        command.run(save(wrong, tmp_path / "i.json"))


def test_the_judge_model_scores_through_the_filter(world, tmp_path):
    from finetune_operator.api.finetunejob import BaseModelRef

    from finetune_trainer.synthesis.generator import ModelJudge, load

    judged = config(world, "work-j", spec={"filters": {"judge": {"rubric": "Is the answer correct?", "minScore": 6}}})
    loaded = load(BaseModelRef(uri=world["model_uri"], digest=world["model_digest"]), None, None, tmp_path)
    judge = ModelJudge(loaded, judged.spec.filters.judge.rubric)
    planted = [("Can a Dataset read from a private bucket?", "FTO: Yes, with a Secret in spec.source."),
               ("How many GPUs does a trainer pod get?", "FTO: One per node unless resources say otherwise.")]
    expected = [judge(*p) for p in planted]
    assert [judge(*p) for p in planted] == expected  # greedy: the same score every time
    f = CandidateFilter(judged.spec, [], [], loaded.count_tokens, judge)
    kept = [f.consider(*p) for p in planted]
    assert [k is not None for k in kept] == [s is not None and s >= 6 for s in expected]
    assert f.removed["judge"] == sum(k is None for k in kept)
    # and the command runs with the judge on (it scores whatever parses)
    assert command.run(save(judged, tmp_path / "j.json")) == 0
    assert "judge" in read_json(storage.join(judged.workURI, records.GENERATION))["removed"]


def test_hostile_inputs_are_errors_naming_the_line_or_field(world, tmp_path):
    from finetune_trainer.errors import DataError
    from finetune_trainer.validate import content_digest

    # a seed file whose digest matches but with a malformed line (written by hand, not by validation)
    train = '{"instruction":"Q?","output":"A."}\n{"instruction":"no output"}\n'
    storage.write_text(f"{world['root']}/bad-seed/train.jsonl", train)
    storage.write_text(f"{world['root']}/bad-seed/eval.jsonl", "")
    bad = synthesis_config(seed_uri=f"{world['root']}/bad-seed", seed_digest=content_digest(train, ""),
                           model_uri=world["model_uri"], work_uri=f"{world['root']}/work-k")
    with pytest.raises(DataError, match=r"bad-seed/train.jsonl line 2: output: "):
        command.run(save(bad, tmp_path / "k.json"))
    # an evaluation file that is not JSON Lines
    storage.write_text(f"{world['root']}/evalset.jsonl", '{"prompt": "fine"}\nnot json\n')
    leaky = config(world, "work-l", eval_set_uris=(f"{world['root']}/evalset.jsonl",))
    with pytest.raises(DataError, match=r"^inputs.evalSetURIs: .*evalset.jsonl line 2: "):
        command.run(save(leaky, tmp_path / "l.json"))
    # a config that is not a SynthesisConfig
    (tmp_path / "m.json").write_text(json.dumps({**config(world, "work-m").model_dump(mode="json"),
                                                 "spec": {"examples": 0}}))
    with pytest.raises(ConfigError, match=r"m.json: spec.seed: Field required"):
        command.run(str(tmp_path / "m.json"))
    # a generation.json that is not one
    storage.write_text(storage.join(f"{world['root']}/work-n", records.GENERATION), '{"kept": -1}')
    with pytest.raises(DataError, match=r"^generation.json: "):
        records.read_generation(f"{world['root']}/work-n")


def test_generating_leaves_autograd_on_for_whatever_runs_next(world, tmp_path):
    import torch

    from finetune_operator.api.finetunejob import BaseModelRef

    from finetune_trainer.synthesis.generator import generate, load

    loaded = load(BaseModelRef(uri=world["model_uri"]), None, None, tmp_path)
    generate(loaded, ["Instruction:"], temperature=0.5, top_p=0.9, max_new_tokens=2, seed=0)
    assert torch.is_grad_enabled()
