"""Pure tests of the operator's governance decisions: policy merge, report integrity, promotion."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from finetune_operator.api.governance import CHECK_NAMES
from finetune_operator.governance import (
    DEFAULT_POLICY, NO_LICENSE_ALLOWED, alias_record, alias_uri, effective_policy, promotion_decision,
    ReportBinding, read_report,
)
from testutil import make_keyring, sign_report

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
KEYS = make_keyring()


def policy(name: str, namespaces=(), **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy",
            "metadata": {"name": name}, "spec": {"namespaces": list(namespaces), **spec}}


def test_no_policy_applies_means_api_defaults_not_no_checks():
    spec, messages = effective_policy([policy("team-x", ["x"], required=["evaluation"])], "other", None)
    assert spec.required == list(CHECK_NAMES)
    assert messages == []
    default_spec, _ = effective_policy([DEFAULT_POLICY], "any", None)
    assert default_spec == spec


def test_policies_merge_strictest_wins():
    p1 = policy("a", required=["evaluation"], bias={"maxGap": 0.2},
                evaluation={"minRelativeImprovement": 0.05},
                provenance={"allowedLicenses": ["MIT", "Apache-2.0"], "requireConsentForPersonalData": False},
                explainability={"samples": 2, "maxProtectedAttributeShare": 0.4})
    p2 = policy("b", ["team"], required=["bias", "pii"], bias={"maxGap": 0.3},
                evaluation={"minRelativeImprovement": 0.01, "minAbsoluteImprovement": 0.1},
                pii={"maxFindings": 3, "maxMemorizationRate": 0.1},
                provenance={"allowedLicenses": ["apache-2.0", "CC-BY-4.0"]},
                explainability={"samples": 8, "maxProtectedAttributeShare": 0.6})
    p3 = policy("c", ["elsewhere"], required=["explainability"], bias={"maxGap": 0.01})
    spec, messages = effective_policy([p2, p1, p3], "team", None)
    assert spec.required == ["evaluation", "bias", "pii"]
    assert spec.bias.maxGap == 0.2
    assert spec.evaluation.minRelativeImprovement == 0.05
    assert spec.evaluation.minAbsoluteImprovement == 0.1
    # Policy "a" leaves pii at the API defaults (0), which are stricter than "b".
    assert spec.pii.maxFindings == 0 and spec.pii.maxMemorizationRate == 0.0
    assert [x.casefold() for x in spec.provenance.allowedLicenses] == ["apache-2.0"]
    assert spec.provenance.requireConsentForPersonalData is True
    assert spec.explainability.samples == 8 and spec.explainability.maxProtectedAttributeShare == 0.4
    assert messages == []


def test_disjoint_license_lists_allow_nothing():
    spec, _ = effective_policy([policy("a", provenance={"allowedLicenses": ["MIT"]}),
                                policy("b", provenance={"allowedLicenses": ["GPL-3.0"]})], "ns", None)
    assert spec.provenance.allowedLicenses == [NO_LICENSE_ALLOWED]


def test_job_may_tighten_but_never_loosen():
    base = policy("p", required=["evaluation", "provenance"], bias={"maxGap": 0.2},
                  pii={"maxFindings": 2, "maxMemorizationRate": 0.1},
                  provenance={"allowedLicenses": ["MIT", "Apache-2.0"]})
    job = {"required": ["evaluation", "pii"], "bias": {"maxGap": 0.5},
           "pii": {"maxFindings": 1, "maxMemorizationRate": 0.3},
           "evaluation": {"minRelativeImprovement": 0.1},
           "provenance": {"allowedLicenses": ["MIT", "WTFPL"], "requireConsentForPersonalData": False}}
    before = copy.deepcopy(job)
    spec, messages = effective_policy([base], "ns", job)
    assert job == before  # inputs are not mutated
    assert spec.required == ["evaluation", "provenance", "pii"]  # pii added, provenance kept
    assert spec.bias.maxGap == 0.2
    assert spec.pii.maxFindings == 1
    assert spec.pii.maxMemorizationRate == 0.1
    assert spec.evaluation.minRelativeImprovement == 0.1
    assert spec.provenance.allowedLicenses == ["MIT"]
    assert spec.provenance.requireConsentForPersonalData is True
    joined = "\n".join(messages)
    for fragment in ("required omits provenance", "bias.maxGap", "pii.maxMemorizationRate", "WTFPL",
                     "requireConsentForPersonalData"):
        assert fragment in joined
    assert "pii.maxFindings" not in joined and "minRelativeImprovement" not in joined


def test_api_defaulted_job_values_do_not_produce_noise():
    # The API server fills defaults into spec.governance: the default maxGap is not a user choice.
    from finetune_operator.api.governance import GAP_DEFAULT

    spec, messages = effective_policy([policy("p", bias={"maxGap": 0.1})], "ns", {"bias": {"maxGap": GAP_DEFAULT}})
    assert spec.bias.maxGap == 0.1
    assert messages == []


def test_job_cannot_swap_the_policy_probe_set():
    p = policy("p", bias={"probesURI": "s3://probes/policy.jsonl"})
    spec, messages = effective_policy([p], "ns", {"bias": {"probesURI": "s3://probes/mine.jsonl"}})
    assert spec.bias.probesURI == "s3://probes/policy.jsonl" and "probesURI" in messages[0]
    spec, messages = effective_policy([policy("q")], "ns", {"bias": {"probesURI": "s3://probes/mine.jsonl"}})
    assert spec.bias.probesURI == "s3://probes/mine.jsonl" and messages == []


def make_report(adapter=A, checks=None, required=("evaluation", "bias")):
    checks = checks if checks is not None else [
        {"name": "evaluation", "passed": True, "value": 0.2, "threshold": 0.05, "message": "ok"},
        {"name": "bias", "passed": True, "value": 0.01, "threshold": 0.25, "message": "ok"},
    ]
    report = {"adapterDigest": adapter, "datasetDigest": B, "baseModelDigest": None,
              "policy": {"required": list(required)}, "checks": checks, "passed": True,
              "createdAt": "2026-01-01T00:00:00Z", "trainerVersion": "0.1.0"}
    return sign_report(report, KEYS, adapter_digest=adapter)


def read(report: dict, adapter: str = A, **kw):
    return read_report(report, ReportBinding(adapter_digest=adapter), KEYS, **kw)


def test_report_round_trip_passes():
    outcome = read(make_report())
    assert outcome.report_ok and outcome.passed and outcome.failing == []


def test_tampered_report_is_not_trusted():
    report = make_report(checks=[{"name": "evaluation", "passed": False, "message": "worse than base"},
                                 {"name": "bias", "passed": True}])
    stmt = json.loads(base64.b64decode(report["payload"]))
    stmt["predicate"]["checks"][0]["passed"] = True  # flipped after signing
    outcome = read({**report, "payload": base64.b64encode(json.dumps(stmt).encode()).decode()})
    assert not outcome.report_ok and not outcome.passed
    assert "signature" in outcome.message and outcome.failing == list(CHECK_NAMES)  # nothing of it is believed


def test_report_of_another_adapter_is_not_trusted():
    outcome = read(make_report(adapter=B))
    assert not outcome.report_ok and not outcome.passed


def test_missing_required_check_counts_as_failed():
    report = make_report(checks=[{"name": "evaluation", "passed": True}])
    outcome = read(report)
    assert outcome.report_ok and not outcome.passed and outcome.failing == ["bias"]
    # The operator's stricter list wins over what the report's policy said.
    outcome = read(make_report(), required=["evaluation", "bias", "pii"])
    assert outcome.failing == ["pii"]


def test_auto_promotion_when_all_pass():
    d = promotion_decision(read(make_report()), {"mode": "auto"}, A, manifest_ok=True)
    assert (d.state, d.reason, d.promote) == ("Promoted", "GovernancePassed", True)


def test_manual_waits_for_approval_of_this_digest():
    outcome = read(make_report())
    d = promotion_decision(outcome, {"mode": "manual"}, A, True)
    assert (d.state, d.reason, d.promote) == ("AwaitingApproval", "AwaitingApproval", False)
    d = promotion_decision(outcome, {"mode": "manual", "approval": {"digest": B, "approvedBy": "eve"}}, A, True)
    assert (d.state, d.reason, d.promote) == ("AwaitingApproval", "ApprovalDigestMismatch", False)
    assert B in d.message and "ignored" in d.message and d.approved_by is None
    d = promotion_decision(outcome, {"mode": "manual", "approval": {"digest": A, "approvedBy": "ana"}}, A, True)
    assert (d.state, d.promote, d.approved_by) == ("Promoted", True, "ana")


def test_approval_cannot_override_a_failed_check():
    report = make_report(checks=[{"name": "evaluation", "passed": True},
                                 {"name": "bias", "passed": False, "message": "gap 0.4 > 0.25"}])
    outcome = read(report)
    for mode in ("auto", "manual"):
        d = promotion_decision(outcome, {"mode": mode, "approval": {"digest": A, "approvedBy": "ana"}}, A, True)
        assert (d.state, d.reason, d.promote) == ("Blocked", "GovernanceFailed", False)
        assert "bias" in d.message


def test_invalid_manifest_blocks():
    d = promotion_decision(read(make_report()), {"mode": "auto"}, A, manifest_ok=False)
    assert (d.state, d.reason, d.promote) == ("Blocked", "ManifestInvalid", False)


@pytest.mark.parametrize("output", ["s3://b/runs/job", "s3://b/runs/job/"])
def test_alias_uri_and_record(output):
    assert alias_uri(output, "prod") == "s3://b/runs/job/aliases/prod.json"
    outcome = read(make_report())
    rec = alias_record("ns", "job", "s3://b/runs/job/adapters/x", A, outcome.passed, outcome.checks,
                       "2026-01-01T00:00:00Z")
    assert rec["adapterDigest"] == A and rec["job"] == {"namespace": "ns", "name": "job"}
    assert [c["name"] for c in rec["governance"]["checks"]] == ["evaluation", "bias"]
