"""Trainer tests keep the base-model cache in a temp folder, never in the user's ~/.cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir(tmp_path_factory):
    previous = os.environ.get("FINETUNE_CACHE_DIR")
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("finetune-cache"))
    yield os.environ["FINETUNE_CACHE_DIR"]
    if previous is None:
        os.environ.pop("FINETUNE_CACHE_DIR", None)
    else:
        os.environ["FINETUNE_CACHE_DIR"] = previous
