"""What the decisions write into status stays small enough for the real API server, whatever size
the message that caused it (issue 12: a 4 MB error became a 4 MB status patch, refused, forever)."""

from __future__ import annotations

import json

from finetune_operator import decisions
from finetune_operator.config import OperatorConfig

HUGE = "x" * (4 << 20)


def test_a_dataset_status_planned_from_a_4mb_error_is_accepted_by_the_api_server(real_cluster, crds, namespace):
    real_cluster.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
                        "metadata": {"name": "huge-error", "namespace": namespace},
                        "spec": {"source": {"uri": "s3://bucket/raw.jsonl"}, "format": "chat",
                                 "provenance": {"origin": "test", "license": "CC0-1.0"}}})
    ds = real_cluster.get("dataset", "huge-error", namespace)
    failed = decisions.summarize_job({"metadata": {"name": "huge-error-validate-1"},
                                      "status": {"conditions": [{"type": "Failed", "status": "True",
                                                                 "reason": "PodFailurePolicy", "message": HUGE}]}})
    report = {"valid": False, "reason": "MalformedLines", "message": HUGE, "stats": {"examples": 0},
              "invalidLineNumbers": [1]}
    plan = decisions.plan_dataset(ds, failed, [], report, OperatorConfig(artifact_store="s3://store"),
                                  "2026-12-01T00:00:00Z")
    real_cluster.kubectl("patch", "dataset", "huge-error", "-n", namespace, "--subresource=status",
                         "--type=merge", "-p", json.dumps({"status": plan.status}))
    stored = real_cluster.get("dataset", "huge-error", namespace)["status"]
    assert stored["phase"] == "Invalid" and f"{len(HUGE)} characters in all" in stored["message"]
    assert stored["message"].endswith("(first offending lines: 1)")
    ready = next(c for c in stored["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and len(ready["message"]) <= 1024
