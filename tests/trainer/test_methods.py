"""Each method trains, eval loss falls, and the published adapter reloads with the same eval loss."""

from __future__ import annotations

import pytest

from finetune_operator.api.finetunejob import Progress
from finetune_trainer import adapter, storage, train
from finetune_trainer.errors import EXIT_OK

from .helpers import read_json, trainer_config, upload_folder, write_config, write_dataset


@pytest.fixture()
def s3_inputs(bucket, tiny_model_dir):
    model_uri = f"s3://{bucket}/models/tiny"
    digest = upload_folder(tiny_model_dir, model_uri)
    data_uri = write_dataset(f"s3://{bucket}/data/v1")
    return {"model_uri": model_uri, "model_digest": digest, "data_uri": data_uri,
            "output_uri": f"s3://{bucket}/runs/r1", "data_digest": "sha256:" + "ab" * 32}


def initial_eval_loss(cfg) -> float:
    """Eval loss of the untrained adapter (LoRA starts as a no-op), computed like the trainer does."""
    import torch

    from finetune_trainer import data, model_io, objective

    path = model_io.fetch_model(cfg.baseModel.uri, cfg.baseModel.digest)
    tok = model_io.load_tokenizer(path)
    eval_set = data.tokenize_all(data.read_examples(cfg.data.uri, "eval.jsonl", cfg.data.format), tok, 96)
    base = model_io.load_base_model(path, precision="fp32", device=torch.device("cpu"))
    return objective.evaluate(base, eval_set, batch_size=4, max_len=96, packing=True, pad_id=tok.pad_token_id,
                              device=torch.device("cpu"))


@pytest.mark.parametrize("method,quantization", [
    ("lora", None),
    ("qlora", {"quantType": "nf4", "doubleQuant": True, "computeDtype": "float32"}),
    ("dora", None),
    ("dora", {"quantType": "fp4", "doubleQuant": False, "computeDtype": "float32"}),  # QDoRA, fp4
])
def test_method_trains_and_eval_loss_falls(method, quantization, s3_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    # gradient checkpointing on for the non-lora runs: the adapters must still learn through it
    cfg = trainer_config(method=method, quantization=quantization, **s3_inputs,
                         training={"maxSteps": 8, "gradientCheckpointing": method != "lora"})
    before = initial_eval_loss(cfg)

    assert train.run(str(write_config(cfg, tmp_path / "job.json"))) == EXIT_OK

    result = read_json(storage.join(cfg.outputURI, "result.json"))
    assert result["metrics"]["steps"] == 8
    assert result["metrics"]["evalLoss"] < before - 0.2, (before, result["metrics"])
    ok, why = adapter.verify(result["adapterURI"])
    assert ok, why
    manifest = read_json(storage.join(result["adapterURI"], "manifest.json"))
    assert manifest["baseModel"]["digest"] == s3_inputs["model_digest"]
    assert manifest["dataset"]["digest"] == s3_inputs["data_digest"]
    assert manifest["training"]["method"] == method
    progress = Progress.model_validate(read_json(storage.join(cfg.outputURI, "progress.json")))
    assert progress.step == progress.totalSteps == 8 and progress.percent == 100
    assert progress.evalLoss == pytest.approx(result["metrics"]["evalLoss"], rel=1e-5)


def test_bf16_and_fp16_fallback_with_schedule_checkpointing_and_accumulation(s3_inputs, tmp_path, monkeypatch):
    """bf16 autocast trains on CPU; fp16 falls back to fp32 there (with a warning), with warmup+cosine,
    gradient checkpointing and accumulation on; the fp16 run also trains without packing."""
    import logging

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage()) if record.levelno == logging.WARNING else None
    logging.getLogger("finetune_trainer").addHandler(handler)
    try:
        for precision in ("bf16", "fp16"):
            cfg = trainer_config(training={
                "precision": precision, "maxSteps": 4, "gradientAccumulationSteps": 2, "lrScheduler": "cosine",
                "warmupRatio": 0.25, "gradientCheckpointing": True, "packing": precision == "bf16"}, **{**s3_inputs,
                "output_uri": s3_inputs["output_uri"] + "-" + precision})
            assert train.run(str(write_config(cfg, tmp_path / f"{precision}.json"))) == EXIT_OK
            result = read_json(storage.join(cfg.outputURI, "result.json"))
            assert result["metrics"]["steps"] == 4 and 0 < result["metrics"]["evalLoss"] < 10
            manifest = read_json(storage.join(result["adapterURI"], "manifest.json"))
            assert manifest["training"]["effectivePrecision"] == ("bf16" if precision == "bf16" else "fp32")
    finally:
        logging.getLogger("finetune_trainer").removeHandler(handler)
    assert any("fp16" in w and "fp32" in w for w in warnings)
