"""Permanent problems exit 3 and transient ones exit 4, each with a message naming what is wrong."""

from __future__ import annotations

import json
import logging

import pytest

from finetune_trainer import cli, storage
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_TRANSIENT_ERROR

from .helpers import trainer_config, upload_folder, write_config, write_dataset


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def run_cli(config_path) -> tuple[int, str]:
    """Run `finetune-trainer train` in-process; return the exit code and the logged error message."""
    handler = Captured()
    logger = logging.getLogger("finetune_trainer")
    logger.addHandler(handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--config", str(config_path)])
    finally:
        logger.removeHandler(handler)
    errors = [r.getMessage() for r in handler.records if r.levelno >= logging.ERROR]
    return exit_info.value.code, "\n".join(errors)


@pytest.fixture()
def s3_job(bucket, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    model_uri = f"s3://{bucket}/models/tiny"
    digest = upload_folder(tiny_model_dir, model_uri)
    data_uri = write_dataset(f"s3://{bucket}/data")

    def make(**overrides):
        args = {"model_uri": model_uri, "model_digest": digest, "data_uri": data_uri,
                "output_uri": f"s3://{bucket}/out", **overrides}
        return write_config(trainer_config(**args), tmp_path / "job.json")

    return make


def test_wrong_model_digest_is_a_config_error_naming_both_digests(s3_job, tmp_path):
    wrong = "sha256:" + "0" * 64
    code, message = run_cli(s3_job(model_digest=wrong))
    assert code == EXIT_CONFIG_ERROR
    assert "baseModel.digest" in message and f"expected {wrong}" in message and "actual sha256:" in message
    # nothing half-downloaded is left in the cache for a later run to trust
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_missing_model_is_a_config_error(s3_job, bucket):
    code, message = run_cli(s3_job(model_uri=f"s3://{bucket}/models/nope", model_digest=None))
    assert code == EXIT_CONFIG_ERROR
    assert f"s3://{bucket}/models/nope" in message and "baseModel.uri" in message


def test_malformed_line_is_a_config_error_naming_file_and_line(s3_job, bucket):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data_uri = write_dataset(f"s3://{bucket}/bad-data", train_lines=[good, good, '{"messages": [}', good])
    code, message = run_cli(s3_job(data_uri=data_uri))
    assert code == EXIT_CONFIG_ERROR
    assert f"{data_uri}/train.jsonl line 3" in message


def test_unreachable_s3_is_transient(s3_job, monkeypatch):
    config_path = s3_job()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("FINETUNE_S3_MAX_ATTEMPTS", "1")
    storage.reset_client()
    try:
        code, message = run_cli(config_path)
    finally:
        monkeypatch.undo()
        storage.reset_client()
    assert code == EXIT_TRANSIENT_ERROR
    assert "S3 unreachable" in message and "127.0.0.1:9" in message


def test_invalid_config_is_a_config_error(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"job": {"name": "x"}, "outputURI": "s3://bucket-x/out"}))
    code, message = run_cli(path)
    assert code == EXIT_CONFIG_ERROR and "baseModel" in message


def test_a_changed_spec_does_not_resume_another_runs_checkpoint(s3_job):
    from finetune_trainer import checkpoint, train

    config = s3_job()
    cfg = train.load_config(str(config))
    assert train.run(str(config)) == 0 and checkpoint.list_steps(cfg.outputURI)
    changed = cfg.model_copy(update={"training": cfg.training.model_copy(update={"learningRate": 1e-4})})
    config.write_text(changed.model_dump_json(exclude_none=True))
    code, message = run_cli(config)
    assert code == EXIT_CONFIG_ERROR
    assert "different configuration" in message and "checkpoints/step-" in message


def test_target_modules_that_match_nothing_are_a_config_error(s3_job):
    code, message = run_cli(s3_job(lora={"targetModules": ["no_such_proj"]}))
    assert code == EXIT_CONFIG_ERROR and "lora.targetModules" in message and "no_such_proj" in message
