"""The chart's Argo CD health checks (helm/finetune-operator/argocd/resource_customizations/), run as
Argo CD runs them: Lua 5.1 (Argo CD embeds gopher-lua, a Lua 5.1), `obj` set to the live object, the
script's return value is the health. The objects come from the real decision code
(tests/gitops_statuses.py), so a change in what the operator writes that the health checks do not
understand fails here, not in someone's Argo CD.

Also runs every case of each health_test.yaml (the file format of argo-cd's resource_customizations
tests), checks that its testdata still is what the decisions produce, and renders the chart's
`argocd.healthChecks` ConfigMap with a real helm.

Regenerate the testdata after a deliberate status change with
`FINETUNE_REGEN_ARGOCD_TESTDATA=1 .venv/bin/python -m pytest tests/test_argocd_health.py`.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess

import pytest
import yaml

pytest.importorskip("lupa.lua51", reason="lupa (dev extra) runs the Argo CD Lua")

import gitops_statuses as paths  # noqa: E402
from gitops_statuses import CHART, CUSTOMIZATIONS, health_lua, run_health  # noqa: E402
from testutil import REPO  # noqa: E402

KINDS = ("Dataset", "FineTuneJob", "GovernancePolicy", "SyntheticDataset", "FederatedFineTuneJob")


# --- every status the decisions produce ---------------------------------------------------------------

EXPECTED = {
    "Dataset/validating": "Progressing",
    "Dataset/validating-running": "Progressing",
    "Dataset/ready": "Healthy",
    "Dataset/invalid": "Degraded",
    "Dataset/failed": "Degraded",
    "Dataset/rejected": "Degraded",
    "Dataset/revalidating": "Progressing",
    "Dataset/stale": "Progressing",
    "FineTuneJob/waiting-missing-dataset": "Missing",
    "FineTuneJob/waiting-validating-dataset": "Progressing",
    "FineTuneJob/waiting-invalid-dataset": "Degraded",
    "FineTuneJob/queued": "Progressing",
    "FineTuneJob/unschedulable": "Progressing",
    "FineTuneJob/infeasible": "Degraded",  # refused by the memory plan: nothing runs until the spec changes
    "FineTuneJob/preempted": "Progressing",  # Kueue will readmit it: in progress, not Suspended or Degraded
    "FineTuneJob/training": "Progressing",
    "FineTuneJob/suspended": "Suspended",
    "FineTuneJob/oom": "Degraded",
    "FineTuneJob/evaluating": "Progressing",
    "FineTuneJob/succeeded": "Healthy",
    "FineTuneJob/awaiting-approval": "Suspended",
    "FineTuneJob/governance-blocked": "Degraded",
    "FineTuneJob/rejected": "Degraded",
    "FineTuneJob/rejected-then-fixed": "Progressing",
    "FineTuneJob/stale": "Progressing",
    "FineTuneJob/publishing": "Progressing",
    "FineTuneJob/publish-failed": "Degraded",
    "FineTuneJob/rolled-back": "Healthy",
    "SyntheticDataset/waiting-seed": "Progressing",
    "SyntheticDataset/seed-invalid": "Degraded",
    "SyntheticDataset/waiting-generator": "Progressing",
    "SyntheticDataset/generating": "Progressing",
    "SyntheticDataset/generation-failed": "Degraded",
    "SyntheticDataset/no-candidates": "Degraded",
    "SyntheticDataset/reviewing": "Suspended",  # waits for people, like a job awaiting approval
    "SyntheticDataset/low-acceptance": "Degraded",
    "SyntheticDataset/finalizing": "Progressing",
    "SyntheticDataset/dataset-created": "Progressing",
    "SyntheticDataset/ready": "Healthy",
    "SyntheticDataset/dataset-invalid": "Degraded",
    "FederatedFineTuneJob/waiting-missing-dataset": "Missing",
    "FederatedFineTuneJob/waiting-validating-dataset": "Progressing",
    "FederatedFineTuneJob/no-consent": "Degraded",
    "FederatedFineTuneJob/starting": "Progressing",
    "FederatedFineTuneJob/training": "Progressing",
    "FederatedFineTuneJob/evaluating": "Progressing",
    "FederatedFineTuneJob/awaiting-approval": "Suspended",
    "FederatedFineTuneJob/succeeded": "Healthy",
    "FederatedFineTuneJob/governance-blocked": "Degraded",
    "FederatedFineTuneJob/server-failed": "Degraded",
    "FederatedFineTuneJob/stale": "Progressing",
}

ALL = paths.all_paths()


def test_every_decision_path_has_an_expected_health():
    assert set(ALL) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_health_of_each_decision_path(name):
    obj = ALL[name]
    health = run_health(obj["kind"], obj)
    assert health["status"] == EXPECTED[name], (name, health, obj["status"].get("phase"))
    if health["status"] in ("Degraded", "Progressing", "Suspended", "Healthy") and name.split("/")[1] != "stale":
        # The operator's own one-line message is what a person reads in the Argo CD UI.
        assert obj["status"]["message"][:200] in health["message"]


def test_blocked_by_governance_is_degraded_naming_the_failing_checks():
    health = run_health("FineTuneJob", ALL["FineTuneJob/governance-blocked"])
    assert health["status"] == "Degraded"
    assert health["message"].startswith("Blocked by governance: failing checks: evaluation (")
    assert "bias (" in health["message"] and "provenance" not in health["message"].split(". ")[0]
    assert "below the threshold" in health["message"]


def test_a_federation_blocked_by_governance_names_the_failing_check_and_site():
    health = run_health("FederatedFineTuneJob", ALL["FederatedFineTuneJob/governance-blocked"])
    assert health["status"] == "Degraded"
    assert health["message"].startswith("Blocked by governance: failing checks: evaluation (loss against the base "
                                         "model not improved")
    assert "north" in health["message"]


def test_awaiting_approval_is_suspended_and_says_which_digest_to_approve():
    health = run_health("FineTuneJob", ALL["FineTuneJob/awaiting-approval"])
    assert health["status"] == "Suspended" and health["message"].startswith("Awaiting approval: ")
    assert f"spec.promotion.approval.digest={paths.DIGEST}" in health["message"]


def test_a_status_for_an_older_generation_is_progressing_not_the_old_verdict():
    for kind in ("Dataset", "FineTuneJob", "FederatedFineTuneJob"):
        health = run_health(kind, ALL[f"{kind}/stale"])
        assert health["status"] == "Progressing" and "generation 2" in health["message"], health


def test_the_api_servers_default_observed_generation_is_not_read_as_an_old_generation():
    """The CRD defaults status.observedGeneration to 0: a first validation shows its own message."""
    validating = copy.deepcopy(ALL["Dataset/validating"])
    assert "observedGeneration" not in validating["status"]
    expected = run_health("Dataset", validating)
    validating["status"]["observedGeneration"] = 0
    assert run_health("Dataset", validating) == expected == {
        "status": "Progressing", "message": "Validating: validation Job ds-validate-1 created"}


def test_an_object_the_operator_has_not_seen_yet_is_progressing():
    for kind, obj in (("Dataset", paths.dataset_obj()), ("FineTuneJob", paths.ftj_obj()),
                      ("FederatedFineTuneJob", paths.fed_obj())):
        obj.pop("status")
        health = run_health(kind, obj)
        assert health["status"] == "Progressing" and "finetune-operator" in health["message"]


def test_governance_policy_is_healthy_and_says_what_it_requires():
    health = run_health("GovernancePolicy", paths.policy_obj())
    assert health == {"status": "Healthy",
                      "message": "requires evaluation, bias, provenance, pii; applies to team-a"}
    bare = {**paths.policy_obj(), "spec": {}}
    assert run_health("GovernancePolicy", bare)["message"] == "requires no checks; applies to every namespace"


def test_scripts_use_only_what_argo_cds_lua_has():
    for kind in KINDS:
        code = "\n".join(line.split("--")[0] for line in health_lua(kind).splitlines())  # comments out
        # Unsafe or missing libraries, and Lua 5.2+ syntax (goto, integer division, bit operators).
        for forbidden in (r"\brequire\s*[(\"']", r"\b(io|os|debug|package|utf8)\.", r"\bgoto\b", r"//", r"~[^=]",
                          r"<<|>>"):
            assert not re.search(forbidden, code), (kind, forbidden)


# --- health_test.yaml (argo-cd's format) and its testdata -------------------------------------------

#: testdata file -> the decision path it holds; the health each file expects is in health_test.yaml.
TESTDATA = {
    "Dataset": {"progressing.yaml": "Dataset/validating", "healthy.yaml": "Dataset/ready",
                "degraded_invalid.yaml": "Dataset/invalid", "degraded_job_failed.yaml": "Dataset/failed",
                "progressing_new_generation.yaml": "Dataset/revalidating"},
    "FineTuneJob": {"missing_dataset.yaml": "FineTuneJob/waiting-missing-dataset",
                    "progressing_training.yaml": "FineTuneJob/training",
                    "progressing_unschedulable.yaml": "FineTuneJob/unschedulable",
                    "progressing_preempted.yaml": "FineTuneJob/preempted",
                    "degraded_infeasible.yaml": "FineTuneJob/infeasible",
                    "progressing_evaluating.yaml": "FineTuneJob/evaluating",
                    "suspended.yaml": "FineTuneJob/suspended",
                    "suspended_awaiting_approval.yaml": "FineTuneJob/awaiting-approval",
                    "healthy.yaml": "FineTuneJob/succeeded",
                    "degraded_governance_blocked.yaml": "FineTuneJob/governance-blocked",
                    "degraded_oom.yaml": "FineTuneJob/oom",
                    "degraded_dataset_invalid.yaml": "FineTuneJob/waiting-invalid-dataset",
                    "degraded_rejected.yaml": "FineTuneJob/rejected",
                    "progressing_stale_generation.yaml": "FineTuneJob/stale",
                    "progressing_publishing.yaml": "FineTuneJob/publishing",
                    "degraded_publish_failed.yaml": "FineTuneJob/publish-failed",
                    "healthy_rolled_back.yaml": "FineTuneJob/rolled-back"},
    "GovernancePolicy": {"healthy.yaml": None},
    "SyntheticDataset": {"progressing_generating.yaml": "SyntheticDataset/generating",
                         "suspended_reviewing.yaml": "SyntheticDataset/reviewing",
                         "degraded_low_acceptance.yaml": "SyntheticDataset/low-acceptance",
                         "degraded_seed_invalid.yaml": "SyntheticDataset/seed-invalid",
                         "healthy.yaml": "SyntheticDataset/ready"},
    "FederatedFineTuneJob": {"missing_dataset.yaml": "FederatedFineTuneJob/waiting-missing-dataset",
                             "progressing_training.yaml": "FederatedFineTuneJob/training",
                             "degraded_no_consent.yaml": "FederatedFineTuneJob/no-consent",
                             "degraded_governance_blocked.yaml": "FederatedFineTuneJob/governance-blocked",
                             "suspended_awaiting_approval.yaml": "FederatedFineTuneJob/awaiting-approval",
                             "healthy.yaml": "FederatedFineTuneJob/succeeded"},
}
#: Per run: a fresh platform key signs the report, so these differ between runs (and mean nothing here).
VOLATILE = ("reportDigest", "signingKey")


def _normalized(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    gov = (obj.get("status") or {}).get("governance") or {}
    for key in VOLATILE:
        gov.pop(key, None)
    return obj


def _source(kind: str, path: str | None) -> dict:
    return paths.policy_obj() if path is None else _normalized(ALL[path])


def _regenerate() -> None:
    for kind, files in TESTDATA.items():
        cases = []
        for file, path in files.items():
            obj = _source(kind, path)
            target = CUSTOMIZATIONS / kind / "testdata" / file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump(obj, sort_keys=False, width=120))
            cases.append({"healthStatus": run_health(kind, obj), "inputPath": f"testdata/{file}"})
        (CUSTOMIZATIONS / kind / "health_test.yaml").write_text(
            "# Cases in argo-cd's resource_customizations format; the testdata is what the operator's decisions\n"
            "# produce (tests/gitops_statuses.py, checked by tests/test_argocd_health.py).\n"
            + yaml.safe_dump({"tests": cases}, sort_keys=False, width=120))


if os.environ.get("FINETUNE_REGEN_ARGOCD_TESTDATA") == "1":
    _regenerate()


@pytest.mark.parametrize("kind", KINDS)
def test_health_test_yaml_cases_pass(kind):
    cases = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())["tests"]
    assert {c["inputPath"] for c in cases} == {f"testdata/{f}" for f in TESTDATA[kind]}
    statuses = set()
    for case in cases:
        obj = yaml.safe_load((CUSTOMIZATIONS / kind / case["inputPath"]).read_text())
        assert run_health(kind, obj) == case["healthStatus"], case["inputPath"]
        statuses.add(case["healthStatus"]["status"])
    if kind == "FineTuneJob":
        assert statuses == {"Healthy", "Progressing", "Degraded", "Suspended", "Missing"}


@pytest.mark.parametrize("kind", KINDS)
def test_testdata_is_what_the_decisions_produce(kind):
    """A status change in decisions.py that the testdata does not show fails here (regenerate it)."""
    for file, path in TESTDATA[kind].items():
        stored = yaml.safe_load((CUSTOMIZATIONS / kind / "testdata" / file).read_text())
        assert stored == _source(kind, path), f"{kind}/testdata/{file} is stale: FINETUNE_REGEN_ARGOCD_TESTDATA=1"


# --- the chart renders them ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helm() -> str:
    subprocess.run(["bash", str(REPO / "hack" / "get-helm.sh")], check=True, capture_output=True, timeout=300)
    return str(REPO / "hack" / "bin" / "helm")


def _template(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "ft", str(CHART), "--namespace", "finetune-system",
                           "--set", "trainer.image=ghcr.io/example/trainer:1", *args],
                          capture_output=True, text=True, timeout=120)


def test_chart_renders_the_health_checks_only_when_enabled(helm):
    off = _template(helm)
    assert off.returncode == 0, off.stderr
    assert "resource.customizations.health" not in off.stdout
    on = _template(helm, "--set", "argocd.healthChecks.enabled=true", "--set", "argocd.healthChecks.namespace=argocd")
    assert on.returncode == 0, on.stderr
    docs = [d for d in yaml.safe_load_all(on.stdout) if d and d.get("kind") == "ConfigMap"
            and "resource.customizations.health.finetune.dev_FineTuneJob" in (d.get("data") or {})]
    assert len(docs) == 1
    cm = docs[0]
    assert cm["metadata"]["namespace"] == "argocd" and cm["metadata"]["name"] == "ft-finetune-operator-argocd-health"
    assert cm["data"] == {f"resource.customizations.health.finetune.dev_{k}": health_lua(k) for k in KINDS}
    # What Argo CD would run is byte for byte the tested script: it judges the same object the same way.
    obj = ALL["FineTuneJob/governance-blocked"]
    script = cm["data"]["resource.customizations.health.finetune.dev_FineTuneJob"]
    assert script == health_lua("FineTuneJob") and run_health("FineTuneJob", obj)["status"] == "Degraded"


def test_chart_schema_rejects_bad_argocd_values(helm):
    for bad in (["--set", "argocd.healthChecks.enabled=yes-please"], ["--set", "argocd.healthChecks.extra=1"],
                ["--set", "argocd.other=1"]):
        result = _template(helm, *bad)
        assert result.returncode != 0 and "argocd" in result.stderr, (bad, result.stderr[-500:])
