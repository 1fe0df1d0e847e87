"""spec.initFrom and training.replay in the trainer: a child continues its parent's weights, records
the lineage, refuses a tampered parent before training, and mixes replay deterministically."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer import continual, storage, train
from finetune_trainer.errors import ConfigError

from .helpers import read_json, trainer_config, upload_folder, write_config, write_dataset


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    model_uri = f"file://{root}/model"
    return {"model_uri": model_uri, "model_digest": upload_folder(tiny_model_dir, model_uri), "root": root,
            "data_a": write_dataset(f"file://{root}/data-a", seed=1), "data_b": write_dataset(f"file://{root}/data-b",
                                                                                              seed=2)}


def run_job(inputs, name: str, data: str, **extra) -> dict:
    cfg = trainer_config(model_uri=inputs["model_uri"], model_digest=inputs["model_digest"], data_uri=data,
                         output_uri=f"file://{inputs['root']}/runs/{name}", job=name, **extra)
    path = write_config(cfg, inputs["root"] / f"{name}-{uuid.uuid4().hex[:6]}.json")
    assert train.run(str(path)) == 0
    return read_json(storage.join(cfg.outputURI, "result.json"))


def parent_ref(result: dict, **kw) -> dict:
    return {"uri": result["adapterURI"], "digest": result["digest"], "source": "adapter", **kw}


def manifest(result: dict) -> dict:
    return read_json(storage.join(result["adapterURI"], "manifest.json"))


def weights(result: dict) -> dict:
    return load_file(storage.parse(storage.join(result["adapterURI"], "adapter_model.safetensors")).key)


@pytest.fixture(scope="module")
def parent(inputs):
    return run_job(inputs, "parent", inputs["data_a"])


def test_child_starts_from_the_parent_weights_and_records_the_chain(inputs, parent):
    # A learning rate of ~0 for one step: the child's weights are the parent's, not a fresh init.
    child = run_job(inputs, "child", inputs["data_b"], initFrom=parent_ref(parent),
                    training={"maxSteps": 1, "learningRate": 1e-12})
    theirs, ours = weights(parent), weights(child)
    assert theirs.keys() == ours.keys()
    assert all(torch.allclose(theirs[k], ours[k], atol=1e-6) for k in theirs)

    lineage = manifest(child)["lineage"]
    assert lineage["parent"] == {"uri": parent["adapterURI"], "digest": parent["digest"], "source": "adapter"}
    assert lineage["chain"] == [{"digest": parent["digest"], "uri": parent["adapterURI"],
                                 "datasetURI": inputs["data_a"], "datasetFormat": "chat"}]
    # A grandchild's chain walks back through the child to the adapter trained from the base model.
    grandchild = run_job(inputs, "grandchild", inputs["data_a"], initFrom=parent_ref(child),
                         training={"maxSteps": 1})
    chain = manifest(grandchild)["lineage"]["chain"]
    assert [e["digest"] for e in chain] == [child["digest"], parent["digest"]]
    assert [e["datasetURI"] for e in chain] == [inputs["data_b"], inputs["data_a"]]
    assert "lineage" not in manifest(parent)  # trained from the base model: no lineage


def _fails_before_training(inputs, name: str, ref: dict, **extra) -> str:
    cfg = trainer_config(model_uri=inputs["model_uri"], data_uri=inputs["data_b"],
                         output_uri=f"file://{inputs['root']}/runs/{name}", initFrom=ref, **extra)
    with pytest.raises(ConfigError) as exc:
        train.run(str(write_config(cfg, inputs["root"] / f"{name}.json")))
    assert storage.list_keys(cfg.outputURI) == []  # no progress, no checkpoint: nothing trained
    return str(exc.value)


def test_a_tampered_parent_stops_the_child_before_training(inputs, parent, tmp_path):
    # A copy of the parent whose weights were changed after it was named.
    copy = f"file://{tmp_path}/tampered"
    for name in storage.list_keys(parent["adapterURI"]):
        storage.copy(storage.join(parent["adapterURI"], name), storage.join(copy, name))
    path = storage.parse(storage.join(copy, "adapter_model.safetensors")).key
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 1
    open(path, "wb").write(bytes(blob))
    message = _fails_before_training(inputs, "tampered", {**parent_ref(parent), "uri": copy})
    assert message.startswith("spec.initFrom (adapter)") and "does not match the manifest" in message

    # The right files, but not the digest the job named.
    message = _fails_before_training(inputs, "wrong-digest", {**parent_ref(parent), "digest": "sha256:" + "1" * 64})
    assert message.startswith("spec.initFrom (adapter)") and "is not the expected sha256:111" in message


def test_a_parent_of_another_shape_is_refused_naming_the_field(inputs, parent):
    message = _fails_before_training(inputs, "shape", parent_ref(parent), lora={"r": 4})
    assert "spec.initFrom" in message and "lora.r: parent 8, this job 4" in message


def test_l2_towards_the_parent_keeps_the_child_closer(inputs, parent):
    def distance(result):
        theirs, ours = weights(parent), weights(result)
        return sum(float((ours[k] - theirs[k]).pow(2).sum()) for k in theirs)

    free = run_job(inputs, "free", inputs["data_b"], initFrom=parent_ref(parent))
    anchored = run_job(inputs, "anchored", inputs["data_b"], initFrom=parent_ref(parent, l2=50.0))
    assert distance(anchored) < 0.5 * distance(free)


def test_replay_mix_is_a_fraction_of_each_epoch_and_a_function_of_seed_and_epoch():
    mix = continual.ReplayMix(n_new=40, n_pool=25, fraction=0.2, seed=3)
    assert mix.per_epoch == 10 and mix.stats(["a"])["fraction"] == 0.2
    first, second = mix.replayed(0), mix.replayed(1)
    assert len(set(first)) == 10 and set(first).isdisjoint(second[:5])  # a pass through the pool, then the next
    assert continual.ReplayMix(40, 25, 0.2, 3).replayed(1) == second  # the same after a restart
    assert continual.ReplayMix(40, 25, 0.2, 4).replayed(0) != first
    batches = mix.epoch_batches([5] * 65, epoch=0, seed=3, batch_size=4, max_len=64, packing=False)
    seen = sorted(i for b in batches for row in b for i in row)
    assert seen == sorted(list(range(40)) + [40 + i for i in first])


def test_replay_is_recorded_in_the_result_and_the_manifest(inputs):
    replay_data = [{"name": "earlier", "uri": inputs["data_a"], "format": "chat"}]
    result = run_job(inputs, "replayed", inputs["data_b"], replayData=replay_data,
                     training={"maxSteps": 2, "replay": {"datasets": ["earlier"], "fraction": 0.25}})
    # 48 new examples, a quarter of each epoch replayed: 16 of the 48 earlier ones.
    assert result["metrics"]["replay"] == {"fraction": 0.25, "examplesPerEpoch": 16, "poolExamples": 48,
                                           "datasets": ["earlier"]}
    assert manifest(result)["replay"] == replay_data
    assert json.dumps(manifest(result)).count("earlier") >= 1


def test_replay_without_its_data_is_refused_not_ignored(inputs):
    cfg = trainer_config(model_uri=inputs["model_uri"], data_uri=inputs["data_b"],
                         output_uri=f"file://{inputs['root']}/runs/no-replay-data",
                         training={"replay": {"datasets": ["earlier"], "fraction": 0.25}})
    with pytest.raises(ConfigError, match="training.replay is set but the config has no replayData"):
        train.run(str(write_config(cfg, inputs["root"] / "no-replay-data.json")))
