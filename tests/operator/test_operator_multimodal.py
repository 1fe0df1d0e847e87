"""End to end: an image-text Dataset and a vision-language FineTuneJob through the real operator.

Synthetic circuit boards (PNGs and the JSONL in S3, relative image paths) are validated by the real
validation Job (standardised copies beside the validated files, image stats in status); a FineTuneJob
trains the tiny LLaVA with LoRA on the language model and the projector trained; the governance Job
runs every check (evaluation, bias on the language path, provenance over the image bytes, pii,
explainability with heatmap PNGs) and the adapter is promoted.
"""

from __future__ import annotations

import json

from operator_e2e import dataset_manifest, finetunejob_manifest, phase
from kube_emulator import wait_for

from finetune_trainer import boards, storage


def test_image_text_dataset_to_promoted_vision_language_adapter(cluster, env, kubelet, operator, tmp_path):
    from finetune_trainer.tiny_vlm import build_tiny_vlm
    from trainer.helpers import upload_folder

    bucket = env["bucket"]
    vlm = build_tiny_vlm(tmp_path / "vlm", extra_text=[boards.QUESTION, *(boards.answer(q) for q in
                                                                           (None, *boards.QUADRANTS))])
    model_uri = f"s3://{bucket}/models/tiny-llava"
    upload_folder(vlm, model_uri)
    raw = boards.write_boards(tmp_path / "raw", 60, seed=11)
    upload_folder(raw.parent, f"s3://{bucket}/raw/boards")
    cluster.create({"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy",
                    "metadata": {"name": "vision"},
                    "spec": {"required": ["evaluation", "bias", "provenance", "pii", "explainability"],
                             "explainability": {"samples": 1}}})
    manifest = dataset_manifest("boards", f"s3://{bucket}/raw/boards/data.jsonl", format="image-text")
    manifest["spec"]["curation"]["images"] = {"maxSide": 32, "format": "PNG"}
    cluster.create(manifest)
    ds = wait_for(lambda: phase(cluster, "boards", "datasets") in ("Ready", "Invalid", "Failed")
                  and cluster.dataset("boards"), 90, "Dataset validated")
    status = ds["status"]
    assert status["phase"] == "Ready", (status, kubelet.log("boards-"))
    images = status["stats"]["images"]
    assert images["images"] == images["distinct"] == 60 and images["standardised"] == "PNG, longest side 32"
    assert {e["name"] for e in images["formats"]} == {"PNG"}
    copies = [k for k in storage.list_keys(f"{status['validatedURI']}/images") if k.endswith(".png")]
    assert len(copies) == 60

    job = finetunejob_manifest("inspector", "boards", model_uri, f"s3://{bucket}/runs/inspector",
                               training={"maxSteps": 20, "batchSize": 8, "maxSeqLength": 128,
                                         "checkpointEverySteps": 10},
                               multimodal={"visionEncoder": "frozen", "projector": "train",
                                           "projectorLearningRate": 0.01},
                               promotion={"mode": "auto", "alias": "inspector"})
    job["spec"]["lora"]["targetModules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]
    cluster.create(job)
    done = wait_for(lambda: phase(cluster, "inspector") in ("Succeeded", "Failed") and cluster.ftj("inspector"),
                    240, "FineTuneJob finished")
    st = done["status"]
    assert st["phase"] == "Succeeded", (st, kubelet.log("inspector-"))
    checks = {c["name"]: c for c in st["governance"]["checks"]}
    assert all(c["passed"] for c in checks.values()), checks
    assert st["promotion"]["state"] == "Promoted"
    alias = json.loads(storage.read_text(f"s3://{bucket}/runs/inspector/aliases/inspector.json"))
    assert alias["adapterDigest"] == st["adapter"]["digest"]
    manifest = json.loads(storage.read_text(f"{st['adapter']['uri']}/manifest.json"))
    assert manifest["training"]["multimodal"]["parts"]["projector"]["mode"] == "full"
    assert manifest["dataset"]["digest"] == status["digest"]
    explain = json.loads(storage.read_text(checks["explainability"]["reportURI"]))
    png = storage.read_bytes(explain["samples"][0]["imageURI"])
    assert png.startswith(b"\x89PNG")
