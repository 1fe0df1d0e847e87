"""The base-model cache: downloaded once, keyed by URI + digest, never trusted half-written."""

from __future__ import annotations

import pytest

from finetune_trainer import model_io, storage
from finetune_trainer.errors import ConfigError

from .helpers import upload_folder


def test_model_is_downloaded_once_and_records_its_digest(bucket, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/models/tiny"
    digest = upload_folder(tiny_model_dir, uri)

    first = model_io.fetch_model(uri, digest)
    assert storage.folder_digest(first) == digest == model_io.model_digest(first)
    storage.delete_prefix(uri)  # the second fetch must not need S3 at all
    assert model_io.fetch_model(uri, digest) == first
    # another digest is another cache entry: it has to be downloaded (and is gone now)
    other = "sha256:" + "1" * 64
    with pytest.raises(ConfigError, match=uri):
        model_io.fetch_model(uri, other)


def test_a_leftover_partial_download_is_ignored(bucket, tiny_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(cache))
    uri = f"s3://{bucket}/models/tiny"
    digest = upload_folder(tiny_model_dir, uri)
    # what a crash mid-download leaves behind: a temp dir with some of the files
    partial = cache / ".partial-crashed"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")

    path = model_io.fetch_model(uri, digest)
    assert path != partial and storage.folder_digest(path) == digest


def test_file_models_are_used_in_place_and_verified(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    digest = storage.folder_digest(tiny_model_dir)
    assert model_io.fetch_model(f"file://{tiny_model_dir}", digest) == tiny_model_dir
    assert model_io.model_digest(tiny_model_dir) == digest  # memoized the second time
    assert model_io.model_digest(tiny_model_dir) == digest
    with pytest.raises(ConfigError, match="no model found"):
        model_io.fetch_model(f"file://{tmp_path}/nowhere", None)
