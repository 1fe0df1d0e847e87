"""The operator reads the base model's config.json and refuses a job that cannot fit its GPU before
any trainer Job exists (so no GPU is ever requested): Failed / Infeasible with the numbers."""

from __future__ import annotations

import json

from operator_e2e import finetunejob_manifest, phase, ready_dataset, status_of
from kube_emulator import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage

LLAMA3_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256}


def test_an_infeasible_job_is_refused_before_any_job_is_created(cluster, env, kubelet, operator):
    ready_dataset(cluster, env["bucket"])
    model = f"s3://{env['bucket']}/models/70b"
    storage.write_text(f"{model}/config.json", json.dumps(LLAMA3_70B))
    manifest = finetunejob_manifest("huge", "ready", model, f"s3://{env['bucket']}/runs/huge")
    manifest["spec"]["resources"] = {"gpusPerNode": 1,
                                     "gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    manifest["spec"]["training"].update(maxSeqLength=2048, precision="bf16", gradientCheckpointing=True)
    cluster.create(manifest)
    wait_for(lambda: phase(cluster, "huge") == "Failed", 30, "Failed")
    st = status_of(cluster, "huge")
    assert get_condition(st["conditions"], "Failed")["reason"] == "Infeasible"
    assert get_condition(st["conditions"], "Feasible")["status"] == "False"
    assert "per GPU" in st["message"] and "NVIDIA-H100-80GB-HBM3 has 80.0 GiB" in st["message"]
    assert st["plan"]["fits"] is False and st["plan"]["perGPUGiB"] > 80
    assert not [j for j in cluster.list("batch/v1", "jobs", "default") if j["metadata"]["name"].startswith("huge-")]
    assert kubelet.started_jobs == []
