"""A validation report's image stats in a Dataset's status: bounded and typed (the report is the pod's
output, from user data), through the real decision function."""

from __future__ import annotations

from finetune_operator.api.dataset import DatasetStatus
from finetune_operator.image_status import image_stats


def test_image_stats_are_bounded_and_typed():
    hostile = {"images": "12", "distinct": -3, "bytes": 10**30, "standardised": "x" * 500,
               "formats": [{"name": "P" * 400, "count": 2}] * 40 + ["junk"],
               "modes": "RGB", "sideHistogram": [{"le": 64, "count": 3}, {"le": 65, "count": 9}, {"le": "64"}]}
    out = image_stats(hostile)
    assert out is not None
    assert len(out["formats"]) == 16 and len(out["formats"][0]["name"]) <= 128
    assert out["modes"] == [] and out["sideHistogram"] == [{"le": 64, "count": 3}]
    assert len(out["standardised"]) <= 64
    DatasetStatus.model_validate({"stats": {"images": out}})  # fits the API type
    assert image_stats(None) is None and image_stats(["not", "an", "object"]) is None


def test_a_ready_dataset_carries_the_reports_image_stats():
    from gitops_statuses import CFG, GOOD_REPORT, T0, T1, dataset_obj, job, step

    from finetune_operator import decisions

    validating = step(dataset_obj(), decisions.plan_dataset(dataset_obj(), None, [], None, CFG, T0))
    images = {"images": 40, "distinct": 38, "bytes": 123456, "formats": [{"name": "PNG", "count": 38}],
              "modes": [{"name": "RGB", "count": 38}], "sideHistogram": [{"le": 64, "count": 38}]}
    report = {**GOOD_REPORT, "stats": {**GOOD_REPORT["stats"], "images": images}}
    ready = step(validating, decisions.plan_dataset(validating, job("ds-validate-1", complete=True, succeeded=1),
                                                    [], report, CFG, T1))
    assert ready["status"]["phase"] == "Ready"
    assert ready["status"]["stats"]["images"] == images
    DatasetStatus.model_validate(ready["status"])
