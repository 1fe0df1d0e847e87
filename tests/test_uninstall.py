"""`finetune-operator release-finalizers` (operator/finetune_operator/uninstall.py): its decisions,
as plain functions. The patches are applied with an independent RFC 6902 implementation (jsonpatch);
the real API server's answer to them is in tests/realcluster/test_helm_chart.py."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from finetune_operator import cli, uninstall
from finetune_operator.handlers import FINALIZER, KOPF_FINALIZER

FOREIGN = "example.com/protect"


def ftj(finalizers=(), deleting=False, output=None, name="j") -> dict:
    meta = {"name": name, "namespace": "team-a", "finalizers": list(finalizers)}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta,
            "spec": {"output": {"uri": "s3://runs/j"} if output is None else output}}


def applied(body: dict, patch: list[dict]) -> list[str]:
    return jsonpatch.apply_patch(copy.deepcopy(body), patch)["metadata"]["finalizers"]


@pytest.mark.parametrize("finalizers, left", [
    ([FINALIZER], []),
    ([KOPF_FINALIZER, FINALIZER], []),
    ([FINALIZER, FOREIGN, KOPF_FINALIZER], [FOREIGN]),
    ([FOREIGN, FINALIZER, "example.com/other", KOPF_FINALIZER], [FOREIGN, "example.com/other"]),
])
def test_release_patch_removes_ours_and_keeps_the_rest_in_order(finalizers, left):
    body = ftj(finalizers)
    patch = uninstall.release_patch(finalizers)
    assert applied(body, patch) == left
    # Every removal is guarded by a test of the value at that index.
    tested = {op["path"]: op["value"] for op in patch if op["op"] == "test"}
    removed = [op["path"] for op in patch if op["op"] == "remove"]
    assert set(removed) == set(tested) and all(tested[p] in uninstall.OURS for p in removed)
    assert patch.index(next(op for op in patch if op["op"] == "remove")) == len(tested)  # tests first


@pytest.mark.parametrize("finalizers", [[], [FOREIGN], ["finetune.dev/other"]])
def test_no_patch_without_our_finalizers(finalizers):
    assert uninstall.release_patch(finalizers) is None
    assert uninstall.plan([ftj(finalizers)]) == []


def test_a_stale_patch_fails_instead_of_removing_another_finalizer():
    read = ftj([FOREIGN, FINALIZER])
    patch = uninstall.release_patch(read["metadata"]["finalizers"])
    changed = ftj([FINALIZER])  # someone removed theirs meanwhile: our index moved
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(changed, patch)
    added = ftj(["example.com/new", FOREIGN, FINALIZER])  # someone added one in front
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(added, patch)


@pytest.mark.parametrize("body, delete_all, expected", [
    (ftj([FINALIZER], deleting=True), False, "s3://runs/j/checkpoints"),
    (ftj([FINALIZER, KOPF_FINALIZER], deleting=True, output={"uri": "file:///data/runs/j/"}), False,
     "file:///data/runs/j/checkpoints"),
    (ftj([FINALIZER]), False, None),  # not being deleted: kept
    (ftj([FINALIZER]), True, "s3://runs/j/checkpoints"),  # unless asked
    (ftj([FINALIZER], deleting=True, output={"uri": "s3://runs/j", "checkpointsOnDelete": "Retain"}), True, None),
    (ftj([KOPF_FINALIZER], deleting=True), False, None),  # our finalizer guards the cleanup; Kopf's does not
])
def test_which_checkpoints_are_deleted(body, delete_all, expected):
    uri, note = uninstall.checkpoints_to_delete(body, delete_all)
    assert uri == expected
    assert bool(note) == (expected is None and FINALIZER in body["metadata"]["finalizers"])


@pytest.mark.parametrize("output, field_note", [
    ({}, "spec.output.uri is missing"),
    ({"uri": "ftp://elsewhere/x"}, "spec.output.uri: ftp://elsewhere/x: unsupported URI scheme"),
    ({"uri": 42}, "spec.output.uri is missing"),
    ("not-an-object", "spec.output is not an object"),
])
def test_a_hostile_output_is_a_note_naming_the_field_and_still_released(output, field_note):
    body = ftj([FINALIZER], deleting=True, output=output)
    (release,) = uninstall.plan([body])
    assert release.checkpoints is None and field_note in release.note
    assert applied(body, release.patch) == []


def test_plan_lists_only_jobs_with_our_finalizers():
    jobs = [ftj([FINALIZER], name="a"), ftj([FOREIGN], name="b"), ftj([], name="c"),
            ftj([KOPF_FINALIZER], deleting=True, name="d")]
    assert [(r.namespace, r.name) for r in uninstall.plan(jobs)] == [("team-a", "a"), ("team-a", "d")]


def test_command_line():
    args = cli.build_parser().parse_args(["release-finalizers", "--stop-deployment=ops/fo", "--namespace", "a",
                                          "--namespace", "b", "--delete-all-checkpoints"])
    assert (args.stop_deployment, args.namespaces, args.delete_all_checkpoints, args.stop_timeout) == \
        ("ops/fo", ["a", "b"], True, 120.0)


def test_a_malformed_stop_deployment_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FINETUNE_CONFIG", raising=False)  # checked before any API call
    lines: list[str] = []
    assert uninstall.main(None, "no-slash", 1, False, say=lines.append) == 2
    assert lines == ["error: --stop-deployment: expected NAMESPACE/NAME, got 'no-slash'"]


def test_an_unreadable_config_is_a_clear_error(monkeypatch, tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("noSuchSetting: 1\n")
    monkeypatch.setenv("FINETUNE_CONFIG", str(bad))
    lines: list[str] = []
    assert uninstall.main(None, None, 1, False, say=lines.append) == 1
    assert lines == [f"error: ValueError: {bad}: unknown setting 'noSuchSetting'"]


def test_federations_release_their_finalizer_and_only_deleted_ones_lose_their_sites():
    from finetune_operator import federation

    def fed(name, deleting, finalizers):
        meta = {"name": name, "namespace": "coord", "finalizers": finalizers}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "spec": {"participants": [
            {"name": "a", "namespace": "team-a", "dataset": "d"}, {"name": "b", "namespace": "team-b", "dataset": "d"},
            {"name": "c", "namespace": "team-a", "dataset": "e"}, {"name": "r", "remote": {"credentialsSecret": "k"}}]}}

    plans = {p.name: p for p in uninstall.plan_federations([
        fed("gone", True, ["other/keep", federation.FINALIZER]), fed("stays", False, [federation.FINALIZER]),
        fed("none", True, ["other/keep"])])}
    assert set(plans) == {"gone", "stays"}
    assert plans["gone"].sites == (("team-a", "finetune.dev/federation=coord.gone"),
                                   ("team-b", "finetune.dev/federation=coord.gone"))
    assert plans["stays"].sites == ()  # a reinstalled operator takes it up again
    released = jsonpatch.apply_patch({"metadata": {"finalizers": ["other/keep", federation.FINALIZER]}},
                                     plans["gone"].patch)
    assert released["metadata"]["finalizers"] == ["other/keep"]
