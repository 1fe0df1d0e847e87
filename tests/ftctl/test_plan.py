"""`ftctl plan FILES`: the memory plan from the manifests and the base model's config.json, before
anything is submitted; exit 1 when a job does not fit its GPU."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from finetune_operator.ftctl.main import app

LLAMA3_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256}


def manifests(tmp_path, model_dir, **spec) -> str:
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "big"},
           "spec": {"baseModel": {"uri": f"file://{model_dir}"}, "datasetRef": {"name": "ds"},
                    "output": {"uri": "s3://out/big"},
                    "resources": {"gpusPerNode": 1,
                                  "gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
                    **spec}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_plan_refuses_a_70b_bf16_job_on_one_h100_and_says_what_fits(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_70B))
    result = CliRunner().invoke(app, ["plan", manifests(tmp_path, model)], terminal_width=200)
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())  # rich wraps long lines
    assert "big: per GPU (1 rank(s), single, NVIDIA-H100-80GB-HBM3)" in out
    assert "weights" in out and "activations" in out
    assert "does not fit: needs" in out and "use method qlora" in out

    ok = CliRunner().invoke(app, ["plan", manifests(tmp_path, model, method="qlora",
                                                    quantization={"quantType": "nf4"},
                                                    resources={"gpusPerNode": 8, "gpuNodeSelector": {
                                                        "nvidia.com/gpu.product": "NVIDIA-H200"}},
                                                    distributed={"strategy": "fsdp"})], terminal_width=200)
    assert ok.exit_code == 0, ok.output
    out = " ".join(ok.output.split())
    assert "8 rank(s), fsdp, NVIDIA-H200" in out and "needs about" in out


def test_plan_names_the_missing_config(tmp_path):
    result = CliRunner().invoke(app, ["plan", manifests(tmp_path, tmp_path / "nowhere")])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "config.json" in out and "Traceback" not in out
