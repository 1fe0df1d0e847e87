"""The published adapter: reloadable by peft with the same eval loss, reproducible, verifiable,
and never visible half-written."""

from __future__ import annotations

import uuid

import pytest
import torch

from finetune_trainer import adapter, data, model_io, objective, storage, train

from .helpers import read_json, trainer_config, upload_folder, write_config, write_dataset


@pytest.fixture(scope="module")
def inputs(s3_server, tiny_model_dir, tmp_path_factory):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    model_uri = f"s3://{bucket}/models/tiny"
    return {"model_uri": model_uri, "model_digest": upload_folder(tiny_model_dir, model_uri),
            "data_uri": write_dataset(f"s3://{bucket}/data/v1"), "bucket": bucket}


def run_to(inputs, output_uri: str, tmp_path, **overrides):
    cfg = trainer_config(model_uri=inputs["model_uri"], model_digest=inputs["model_digest"],
                         data_uri=inputs["data_uri"], output_uri=output_uri, **overrides)
    assert train.run(str(write_config(cfg, tmp_path / f"job-{uuid.uuid4().hex[:6]}.json"))) == 0
    return cfg, read_json(storage.join(output_uri, "result.json"))


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    return run_to(inputs, f"s3://{inputs['bucket']}/runs/a", tmp,
                  training={"maxSteps": 6, "evalEverySteps": 3, "gradientAccumulationSteps": 2})


def test_adapter_reloads_with_peft_and_gives_the_same_eval_loss(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, result = trained
    local = storage.download_folder(result["adapterURI"], tmp_path / "adapter")
    assert sorted(p.name for p in local.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "manifest.json"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(local))
    tok = model_io.load_tokenizer(tiny_model_dir)
    t = cfg.training
    eval_set = data.tokenize_all(data.read_examples(cfg.data.uri, "eval.jsonl", "chat"), tok, t.maxSeqLength)
    loss = objective.evaluate(model, eval_set, batch_size=t.batchSize, max_len=t.maxSeqLength, packing=True,
                              pad_id=tok.pad_token_id, device=torch.device("cpu"))
    assert loss == pytest.approx(result["metrics"]["evalLoss"], rel=1e-5)


def test_result_and_manifest_describe_the_run(trained):
    cfg, result = trained
    manifest_bytes = storage.read_bytes(storage.join(result["adapterURI"], "manifest.json"))
    import hashlib
    import json

    assert result["digest"] == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    assert result["adapterURI"].endswith(result["digest"].removeprefix("sha256:"))
    manifest = json.loads(manifest_bytes)
    assert manifest["metrics"] == result["metrics"]
    assert set(manifest["files"]) == set(adapter.ADAPTER_FILES)
    adapter_config = json.loads(storage.read_text(storage.join(result["adapterURI"], "adapter_config.json")))
    assert adapter_config["base_model_name_or_path"] == cfg.baseModel.uri
    assert adapter_config["use_dora"] is False and adapter_config["r"] == cfg.lora.r
    assert result["sizeBytes"] == sum(f["size"] for f in manifest["files"].values()) + len(manifest_bytes)
    assert manifest["training"]["training"]["maxSteps"] == 6 and manifest["trainerVersion"]
    assert adapter.list_adapters(cfg.outputURI) == [result["adapterURI"]]
    # staging is gone and checkpoints were pruned to keepCheckpoints
    assert not [k for k in storage.list_keys(storage.join(cfg.outputURI, "adapters")) if ".staging" in k]


def test_same_seed_gives_the_same_run(inputs, trained, tmp_path):
    _, first = trained
    _, second = run_to(inputs, f"s3://{inputs['bucket']}/runs/b", tmp_path,
                       training={"maxSteps": 6, "evalEverySteps": 3, "gradientAccumulationSteps": 2})
    assert second["metrics"] == first["metrics"]
    assert second["digest"] == first["digest"]
    _, other_seed = run_to(inputs, f"s3://{inputs['bucket']}/runs/c", tmp_path,
                           training={"maxSteps": 6, "seed": 99})
    assert other_seed["metrics"]["trainLoss"] != first["metrics"]["trainLoss"]


def test_verify_catches_a_tampered_file(trained):
    _, result = trained
    src = result["adapterURI"]
    copy = src.replace("/runs/a/", "/runs/tampered/")
    for name in storage.list_keys(src):
        storage.copy(storage.join(src, name), storage.join(copy, name))
    assert adapter.verify(copy)[0]
    storage.write_bytes(storage.join(copy, "adapter_config.json"), b"{}")
    ok, why = adapter.verify(copy)
    assert not ok and "adapter_config.json" in why
    ok, why = adapter.verify(copy.rsplit("/", 1)[0] + "/" + "0" * 64)
    assert not ok and "no manifest.json" in why


def test_a_crash_while_publishing_leaves_no_adapter_and_a_rerun_finishes(inputs, tmp_path, monkeypatch):
    """Kill the publish after its first copy: no result.json, nothing listed as an adapter; the rerun
    resumes from the final checkpoint (no retraining) and publishes the same digest."""
    output = f"s3://{inputs['bucket']}/runs/crash"
    real_copy, copies = storage.copy, []

    def copy_then_die(src, dst):
        if copies:
            raise KeyboardInterrupt("simulated kill during upload")
        copies.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_to(inputs, output, tmp_path, training={"maxSteps": 4})
    monkeypatch.setattr(storage, "copy", real_copy)

    assert copies and not storage.exists(storage.join(output, "result.json"))
    assert storage.exists(storage.join(output, "checkpoints/step-00000004/checkpoint.json"))
    assert adapter.list_adapters(output) == []
    half = copies[0].rsplit("/", 1)[0]
    assert not adapter.verify(half)[0]

    _, result = run_to(inputs, output, tmp_path, training={"maxSteps": 4})
    assert result["adapterURI"] == half and adapter.verify(half)[0]
    assert adapter.list_adapters(output) == [half]
    assert not [k for k in storage.list_keys(storage.join(output, "adapters")) if ".staging" in k]


def test_manifest_records_the_base_model_digest_even_when_the_job_pins_none(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = trainer_config(model_uri=inputs["model_uri"], data_uri=inputs["data_uri"],
                         output_uri=f"s3://{inputs['bucket']}/runs/nodigest", training={"maxSteps": 2})
    assert cfg.baseModel.digest is None
    assert train.run(str(write_config(cfg, tmp_path / "job.json"))) == 0
    result = read_json(storage.join(cfg.outputURI, "result.json"))
    manifest = read_json(storage.join(result["adapterURI"], "manifest.json"))
    assert manifest["baseModel"]["digest"] == inputs["model_digest"]
