"""Shared fixtures: a real S3-compatible server (moto_server over HTTP) and tiny HF models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from testutil import REPO, free_port, wait_for_port  # noqa: F401  (REPO re-exported for fixtures)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



@pytest.fixture(scope="session")
def s3_server():
    """Start moto_server on 127.0.0.1 and point the AWS environment at it (for subprocesses too)."""
    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.update(env)
        from finetune_trainer import storage

        storage.reset_client()
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """host:port of a real OCI registry (docker-registry, plain HTTP) for this session."""
    import registry

    if registry.binary() is None:
        pytest.skip("docker-registry is not installed (hack/install-registry.sh)")
    with registry.running_registry(tmp_path_factory.mktemp("registry"), free_port()) as address:
        yield address


@pytest.fixture()
def bucket(s3_server) -> str:
    """A fresh, empty bucket on the S3 server; returns its name."""
    from finetune_trainer import storage

    name = f"t-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def memorized_generator_dir(tmp_path_factory) -> Path:
    """A tiny generator that learnt to continue Self-Instruct prompts over the quickstart's seed set
    (tests/memorized_generator.py): a SyntheticDataset gets parseable, novel candidates from it."""
    import json

    import memorized_generator

    seeds = REPO / "examples" / "quickstart" / "data" / "support-answers.jsonl"
    pairs = [(j["instruction"], j["output"]) for j in map(json.loads, seeds.read_text().splitlines())]
    return memorized_generator.build(tmp_path_factory.mktemp("generator") / "model", pairs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-shaped model + offline tokenizer with a chat template, in HF format."""
    from finetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")
