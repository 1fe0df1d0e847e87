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


def test_a_dataset_status_with_curation_stats_from_a_hostile_report_is_accepted(real_cluster, crds, namespace):
    """issue 14: status.stats.curation and the SmallDataset condition, planned from a report whose
    curation stats are huge and malformed, fit the CRD's schema and the API server's limits."""
    real_cluster.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
                        "metadata": {"name": "curated", "namespace": namespace},
                        "spec": {"source": {"uri": "s3://bucket/raw.jsonl"}, "format": "chat",
                                 "provenance": {"origin": "test", "license": "CC0-1.0"},
                                 "curation": {"nearDuplicates": {}, "quality": {}, "decontamination": {}}}})
    ds = real_cluster.get("dataset", "curated", namespace)
    done = decisions.summarize_job({"metadata": {"name": "curated-validate-1"},
                                    "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    curation = {"settingsDigest": "sha256:" + "a" * 64, "removedURI": "s3://bucket/out/removed.jsonl" + "x" * 4096,
                "steps": [{"step": s, "removed": 10**9, "lines": list(range(10**4)), "examples": [HUGE[:10**5]] * 50}
                          for s in ("exactDuplicate", "nearDuplicate", "decontamination", "bogus")] * 20,
                "duplicates": {"exact": 1, "near": 2, "eval": 3, "other": 4},
                "tokenHistogram": [{"le": 8, "count": 1}, {"le": -1, "count": 2}] * 1000,
                "sources": [{"name": HUGE[:5000], "count": 7}] * 1000, "tags": [{"name": "t", "count": 1}] * 1000,
                "evalSetURIs": ["s3://bucket/eval.jsonl"] * 100, "tokenCount": HUGE}
    report = {"valid": True, "reason": "Validated", "message": "ok", "digest": "sha256:" + "b" * 64,
              "stats": {"examples": 120, "evalExamples": 12, "curation": curation}}
    plan = decisions.plan_dataset(ds, done, [], report, OperatorConfig(artifact_store="s3://store"),
                                  "2026-12-01T00:00:00Z")
    real_cluster.kubectl("patch", "dataset", "curated", "-n", namespace, "--subresource=status",
                         "--type=merge", "-p", json.dumps({"status": plan.status}))
    stored = real_cluster.get("dataset", "curated", namespace)["status"]
    assert stored["phase"] == "Ready" and len(json.dumps(stored)) < 64_000
    steps = stored["stats"]["curation"]["steps"]
    assert [s["step"] for s in steps] == ["exactDuplicate", "nearDuplicate", "decontamination"]
    assert all(len(s["lines"]) == 10 and len(s["examples"]) == 3 for s in steps)
    small = next(c for c in stored["conditions"] if c["type"] == "SmallDataset")
    assert small["status"] == "True" and "120 training examples" in small["message"]
