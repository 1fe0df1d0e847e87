"""issue 15 on the real API server: an image-text Dataset with curation.images and a FineTuneJob with
spec.multimodal are accepted as written (defaults filled by the schema), invalid multimodal settings are
refused naming the field, and a status with image stats planned from a hostile report fits the CRD."""

from __future__ import annotations

import json

import pytest

from finetune_operator import decisions
from finetune_operator.config import OperatorConfig

HUGE = "x" * (1 << 20)


def test_image_text_dataset_and_multimodal_job_are_accepted(real_cluster, crds, namespace):
    real_cluster.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
                        "metadata": {"name": "boards", "namespace": namespace},
                        "spec": {"source": {"uri": "s3://bucket/boards/data.jsonl"}, "format": "image-text",
                                 "provenance": {"origin": "test", "license": "CC0-1.0"},
                                 "curation": {"images": {"maxSide": 336}}}})
    stored = real_cluster.get("dataset", "boards", namespace)["spec"]
    assert stored["format"] == "image-text" and stored["curation"]["images"] == {"maxSide": 336, "format": "PNG"}
    real_cluster.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                        "metadata": {"name": "inspector", "namespace": namespace},
                        "spec": {"baseModel": {"uri": "s3://models/llava"}, "datasetRef": {"name": "boards"},
                                 "multimodal": {"visionEncoder": "lora", "visionLearningRate": 1e-5},
                                 "output": {"uri": "s3://bucket/runs/inspector"}}})
    job = real_cluster.get("finetunejob", "inspector", namespace)["spec"]["multimodal"]
    assert job == {"visionEncoder": "lora", "visionLearningRate": 1e-5, "projector": "train"}


@pytest.mark.parametrize("multimodal, field", [({"visionEncoder": "partial"}, "spec.multimodal.visionEncoder"),
                                               ({"projectorLearningRate": 0}, "spec.multimodal.projectorLearningRate")])
def test_invalid_multimodal_settings_are_refused(real_cluster, crds, namespace, multimodal, field):
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": "bad", "namespace": namespace},
                "spec": {"baseModel": {"uri": "s3://models/llava"}, "datasetRef": {"name": "boards"},
                         "multimodal": multimodal, "output": {"uri": "s3://bucket/runs/bad"}}}
    proc = real_cluster.apply(manifest, check=False)
    assert proc.returncode != 0 and field in proc.stderr + proc.stdout


def test_image_stats_from_a_hostile_report_fit_the_crd(real_cluster, crds, namespace):
    real_cluster.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
                        "metadata": {"name": "pictures", "namespace": namespace},
                        "spec": {"source": {"uri": "s3://bucket/raw.jsonl"}, "format": "image-text",
                                 "provenance": {"origin": "test", "license": "CC0-1.0"}}})
    ds = real_cluster.get("dataset", "pictures", namespace)
    done = decisions.summarize_job({"metadata": {"name": "pictures-validate-1"},
                                    "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    images = {"images": 10**12, "distinct": -1, "bytes": "many", "standardised": HUGE,
              "formats": [{"name": HUGE[:5000], "count": 1}] * 1000, "modes": [{"name": "RGB", "count": 2}] * 100,
              "sideHistogram": [{"le": 64, "count": 1}, {"le": 3, "count": 1}] * 1000}
    report = {"valid": True, "reason": "Validated", "message": "ok", "digest": "sha256:" + "c" * 64,
              "stats": {"examples": 120, "evalExamples": 12, "images": images}}
    plan = decisions.plan_dataset(ds, done, [], report, OperatorConfig(artifact_store="s3://store"),
                                  "2026-12-01T00:00:00Z")
    real_cluster.kubectl("patch", "dataset", "pictures", "-n", namespace, "--subresource=status",
                         "--type=merge", "-p", json.dumps({"status": plan.status}))
    stored = real_cluster.get("dataset", "pictures", namespace)["status"]
    assert stored["phase"] == "Ready" and len(json.dumps(stored)) < 64_000
    assert len(stored["stats"]["images"]["formats"]) == 16 and len(stored["stats"]["images"]["standardised"]) <= 64
