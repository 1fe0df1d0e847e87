"""Preemption: SIGKILL mid-training resumes from the last checkpoint and ends where an uninterrupted
run ends; SIGTERM checkpoints and exits 5. The trainer runs as a subprocess, like in its pod."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from finetune_trainer import checkpoint, storage, train
from finetune_trainer.errors import EXIT_PREEMPTED

from testutil import free_port

from .helpers import read_json, run_trainer, trainer_command, trainer_config, upload_folder, write_config, write_dataset

STEPS = 10


@pytest.fixture()
def job(bucket, tiny_model_dir, tmp_path):
    model_uri = f"s3://{bucket}/models/tiny"
    digest = upload_folder(tiny_model_dir, model_uri)

    def make(output: str, metrics_port: int = 0, **training):
        settings = {"maxSteps": STEPS, "checkpointEverySteps": 2, "keepCheckpoints": 2, "evalEverySteps": 5,
                    "gradientCheckpointing": True, **training}
        # dropout on: resuming must restore the RNG to reproduce the run
        cfg = trainer_config(model_uri=model_uri, model_digest=digest, data_uri=write_dataset(
            f"s3://{bucket}/data"), output_uri=f"s3://{bucket}/{output}", training=settings, lora={"dropout": 0.1},
            metricsPort=metrics_port)
        return cfg, write_config(cfg, tmp_path / f"{output}.json")

    return make


def env_with(**extra) -> dict:
    """This process's environment (same thread count as the in-process comparison run) plus `extra`."""
    return {**os.environ, **extra}


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_then_restart_resumes_and_matches_an_uninterrupted_run(job, tmp_path):
    cfg, path = job("killed")
    env = env_with(FINETUNE_CACHE_DIR=str(tmp_path / "cache"), FINETUNE_DEBUG_STEP_SLEEP="0.3")
    proc = subprocess.Popen(trainer_command(path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: 4 in checkpoint.list_steps(cfg.outputURI), what="checkpoint step 4")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert not storage.exists(storage.join(cfg.outputURI, "result.json"))
    killed_at = max(checkpoint.list_steps(cfg.outputURI))
    assert 4 <= killed_at < STEPS

    done = run_trainer(path, env=env_with(FINETUNE_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'"event": "resume", "step": {killed_at}' in done.stderr
    resumed = read_json(storage.join(cfg.outputURI, "result.json"))
    assert resumed["metrics"]["steps"] == STEPS
    assert read_json(storage.join(cfg.outputURI, "progress.json"))["step"] == STEPS
    # pruned to keepCheckpoints complete checkpoints
    assert checkpoint.list_steps(cfg.outputURI) == [STEPS, STEPS - 2]

    straight_cfg, straight_path = job("straight")
    assert train.run(str(straight_path)) == 0
    straight = read_json(storage.join(straight_cfg.outputURI, "result.json"))
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["digest"] == straight["digest"]


def scrape(port: int) -> dict[str, float]:
    """The trainer's metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in lines if line and not line.startswith("#"))}


def test_sigterm_writes_a_checkpoint_and_exits_5(job, tmp_path):
    port = free_port()
    cfg, path = job("terminated", metrics_port=port, checkpointEverySteps=100)
    env = env_with(FINETUNE_CACHE_DIR=str(tmp_path / "cache"), FINETUNE_DEBUG_STEP_SLEEP="0.3")
    proc = subprocess.Popen(trainer_command(path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        progress_uri = storage.join(cfg.outputURI, "progress.json")
        wait_for(lambda: storage.exists(progress_uri) and read_json(progress_uri)["step"] >= 1, what="step 1")
        # the live metrics endpoint of the running trainer, labelled with the job
        labels = '{job="test-job",namespace="default"}'
        metrics = scrape(port)
        assert metrics[f"finetune_trainer_step{labels}"] >= 1
        assert metrics[f"finetune_trainer_total_steps{labels}"] == STEPS
        assert metrics[f"finetune_trainer_tokens_total{labels}"] > 0
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    steps = checkpoint.list_steps(cfg.outputURI)
    assert len(steps) == 1 and 1 <= steps[0] < STEPS
    assert read_json(storage.join(cfg.outputURI, "progress.json"))["step"] == steps[0]
    assert not storage.exists(storage.join(cfg.outputURI, "result.json"))
    assert '"event": "preempted"' in stderr
