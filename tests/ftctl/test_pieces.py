"""The plain functions behind ftctl: no subprocess, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.ftctl import display, logic
from finetune_operator.ftctl.cluster import merge_patch
from finetune_operator.ftctl.errors import FtctlError
from finetune_operator.ftctl.executor import last_error
from finetune_operator.ftctl.local import TINY_TRAINING, shrink_for_tiny
from finetune_operator.ftctl.main import watch_done, watch_exit_code
from finetune_operator.ftctl.manifests import load

from .conftest import QUICKSTART, write_manifests

DIGEST = "sha256:" + "1" * 64


def test_relative_file_uris_resolve_against_the_working_directory(tmp_path):
    obj = {"spec": {"source": {"uri": "file://data/x.jsonl"}, "output": {"uri": "s3://bucket/out"},
                    "list": ["file:///abs/path", "file://rel"]}}
    out = logic.absolute_uris(obj, tmp_path)
    assert out["spec"]["source"]["uri"] == f"file://{tmp_path.resolve()}/data/x.jsonl"
    assert out["spec"]["output"]["uri"] == "s3://bucket/out"
    assert out["spec"]["list"] == ["file:///abs/path", f"file://{tmp_path.resolve()}/rel"]


def test_local_objects_get_what_the_api_server_adds(tmp_path):
    manifests = load([QUICKSTART])
    job = logic.local_object(manifests.jobs[0], tmp_path)
    again = logic.local_object(manifests.jobs[0], tmp_path)
    assert job["metadata"]["namespace"] == "default" and job["metadata"]["generation"] == 1
    assert job["metadata"]["uid"] == again["metadata"]["uid"]  # stable: the same run names the same objects
    assert "status" not in job


def test_tiny_shrinks_steps_and_swaps_the_model():
    spec = load([QUICKSTART]).jobs[0]["spec"]
    tiny = shrink_for_tiny(spec, Path("/cache/tiny"))
    assert tiny["baseModel"] == {"uri": "file:///cache/tiny"}
    assert tiny["output"]["uri"] == spec["output"]["uri"] + "-tiny"  # never mixed with a real run
    assert tiny["training"]["maxSteps"] == TINY_TRAINING["maxSteps"] < spec["training"]["maxSteps"]
    assert tiny["training"]["maxSeqLength"] <= 128 and tiny["training"]["precision"] == "fp32"
    assert spec["baseModel"]["uri"].endswith("smollm2-135m-instruct")  # the input is not modified
    small = shrink_for_tiny({**spec, "training": {"epochs": 3, "batchSize": 2}}, Path("/t"))["training"]
    assert "epochs" not in small and small["batchSize"] == 2  # epochs would fight with maxSteps


def test_observed_job_reads_like_the_job_controller():
    job = {"metadata": {"name": "j-train-1", "annotations": {}}, "spec": {}}
    running, pods = logic.observed_job(job, None, "2026-01-01T00:00:00Z", None)
    assert running["active"] == 1 and pods[0]["phase"] == "Running"
    done, pods = logic.observed_job(job, 0, "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z")
    assert done["complete"] and pods[0]["terminated"]["exitCode"] == 0
    config_error, pods = logic.observed_job(job, 3, "t", "t", "bad field")
    assert config_error["failedCondition"]["reason"] == "PodFailurePolicy"
    assert not logic.should_retry(3) and not logic.should_retry(5) and logic.should_retry(4)


def test_job_command_maps_the_config_mount():
    job = {"spec": {"template": {"spec": {"containers": [{"command": [
        "finetune-trainer", "train", "--config", "/etc/finetune/job.json"]}]}}}}
    assert logic.job_command(job) == ("train", "job.json")
    cm = {"data": {"job.json": '{"metricsPort": 9400, "outputURI": "file:///x"}'}}
    assert logic.job_config(cm, "job.json") == {"metricsPort": 0, "outputURI": "file:///x"}


def test_merge_patch_removes_what_the_manifest_dropped():
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}
    new = {"a": 1, "b": {"c": 5}, "e": [1, 2], "f": "x"}
    assert merge_patch(old, new) == {"b": {"c": 5, "d": None}, "e": [1, 2], "f": "x"}
    assert merge_patch(new, new) == {}


@pytest.mark.parametrize("status, spec, generation, done", [
    ({"phase": "Training"}, {}, 1, False),
    ({"phase": "Succeeded", "observedGeneration": 1}, {}, 1, True),
    ({"phase": "Succeeded", "observedGeneration": 1}, {}, 2, False),  # status older than the spec
    ({"phase": "AwaitingApproval", "adapter": {"digest": DIGEST}}, {}, 1, True),
    ({"phase": "AwaitingApproval", "adapter": {"digest": DIGEST}},
     {"promotion": {"approval": {"digest": DIGEST}}}, 1, False),  # approved: the operator moves on
    ({"phase": "AwaitingApproval", "adapter": {"digest": DIGEST}},
     {"promotion": {"approval": {"digest": "sha256:" + "2" * 64}}}, 1, True),  # ignored approval
])
def test_watch_stops_only_when_the_operator_waits_for_nobody(status, spec, generation, done):
    assert watch_done({"metadata": {"generation": generation}, "spec": spec, "status": status}) is done


def test_watch_exit_codes_match_run():
    assert watch_exit_code({"status": {"phase": "Succeeded"}}) == 0
    assert watch_exit_code({"status": {"phase": "Failed"}}) == 1
    assert watch_exit_code({"status": {"phase": "Failed", "promotion": {"state": "Blocked"}}}) == 3


def test_last_error_prefers_the_logged_error(tmp_path):
    log = tmp_path / "x.log"
    log.write_text('{"level": "info", "msg": "start"}\n{"level": "error", "msg": "line 7: messages[1].role: bad"}\n'
                   "Some warning printed after\n")
    assert last_error(log) == "line 7: messages[1].role: bad"
    log.write_text("Traceback (most recent call last):\nValueError: boom\n")
    assert last_error(log) == "ValueError: boom"


def test_manifest_loading_rejects_duplicates_and_bad_yaml(tmp_path):
    docs = load([QUICKSTART])
    write_manifests(tmp_path / "twice.yaml", docs.datasets[0], docs.datasets[0])
    with pytest.raises(FtctlError, match="defined twice"):
        load([tmp_path / "twice.yaml"])
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(FtctlError, match=r"bad.yaml:\d+: not valid YAML"):
        load([tmp_path / "bad.yaml"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtctlError, match="no .yaml"):
        load([tmp_path / "empty"])


def test_tables_render_status_fields():
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(display.jobs_table([{"metadata": {"name": "j"}, "status": {
        "phase": "Training", "progress": {"step": 3, "totalSteps": 12, "percent": 25, "etaSeconds": 3700},
        "governance": {"passed": False, "checks": [{"name": "bias", "passed": False}]}}}]))
    text = console.export_text()
    assert "3/12 (25%)" in text and "1h01m" in text and "failed: bias" in text


def test_messages_with_brackets_are_shown_verbatim():
    """Check messages and samples quote data: a redaction placeholder is not rich markup."""
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(display.governance_table(
        [{"name": "pii", "passed": False, "message": "model wrote [EMAIL] and [/] verbatim"}], False))
    console.print(display.samples_table([{"prompt": "[bold]hi", "before": "[red]x", "after": "FTO: [PHONE]"}]))
    text = console.export_text()
    assert "model wrote [EMAIL] and [/] verbatim" in text
    assert "[bold]hi" in text and "[red]x" in text and "FTO: [PHONE]" in text
