"""Governance decisions of the operator: which policy applies, what a report says, whether to promote.

Everything here is pure (no I/O, no Kubernetes client, no torch) so the operator, `ftctl`
and the governance command itself share one implementation, and every rule is testable
without a cluster.

- `effective_policy`: merge the GovernancePolicies that apply to a namespace, strictest
  wins, then let the job's `spec.governance` tighten (never loosen) the result.
- `read_report`: the governance report is an in-toto Statement in a DSSE envelope signed by
  the platform key (attestation.py); a report that is unsigned, signed by another key,
  edited, or bound to another adapter, policy, run, job or dataset is not trusted.
- `promotion_decision`: Promoted, AwaitingApproval or Blocked, with a CamelCase reason.
- `alias_uri` / `alias_record`: where and what the promotion alias is.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from . import attestation
from .api.governance import ALL_CHECKS, CHECK_NAMES, CheckResult, GovernanceSpec

#: allowedLicenses after intersecting non-empty lists that share nothing: no license is
#: allowed. An empty list would mean "any license", so the emptiness needs a marker that
#: can never be a real license name (SPDX ids do not contain "!").
NO_LICENSE_ALLOWED = "!no-license-allowed"

#: The GovernancePolicy the operator applies when the cluster has none: the API defaults
#: (every check required, default thresholds). Callers pass it in `policies` themselves.
DEFAULT_POLICY: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "GovernancePolicy",
    "metadata": {"name": "operator-default"},
    "spec": {},
}

# How each threshold is merged: "max" means a larger value is stricter, "min" a smaller one.
_STRICTNESS: dict[str, dict[str, str]] = {
    # bootstrapSeed is not here: not a strictness; the first policy's (by name) holds, and a job
    # cannot set it (it could otherwise try seeds until one passes).
    "evaluation": {"minRelativeImprovement": "max", "minAbsoluteImprovement": "max", "minExactMatch": "max",
                   "confidence": "max", "bootstrapSamples": "max", "minExamples": "max"},
    "bias": {"maxGap": "min", "maxFlipRate": "min", "maxDemographicParityDifference": "min"},
    "pii": {"maxFindings": "min", "maxMemorizationRate": "min"},
    "explainability": {"samples": "max", "maxProtectedAttributeShare": "min"},
    "retention": {"maxForgetting": "min"},
}
# Data locations: not comparable by strictness; the first policy (by name) that sets one wins,
# and a job may only add one where the policy has none.
_LOCATIONS: dict[str, str] = {"evaluation": "evalSetURI", "bias": "probesURI", "retention": "evalSetURIs"}

_DEFAULTS = GovernanceSpec().model_dump()


def _stricter(a: Any, b: Any, how: str) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b) if how == "max" else min(a, b)


def _is_tighter_or_equal(job_value: Any, current: Any, how: str) -> bool:
    if current is None:
        return True  # the policy does not set it: any value adds a requirement
    if job_value is None:
        return False
    return job_value >= current if how == "max" else job_value <= current


def _intersect_licenses(a: list[str], b: list[str]) -> list[str]:
    if not a:
        return list(b)
    if not b:
        return list(a)
    b_folded = {x.casefold() for x in b}
    common = [x for x in a if x.casefold() in b_folded]
    return common or [NO_LICENSE_ALLOWED]


def applies_to(policy: dict, namespace: str) -> bool:
    namespaces = (policy.get("spec") or {}).get("namespaces") or []
    return not namespaces or namespace in namespaces


def _merge_policy(merged: dict, spec: dict) -> None:
    """Fold one (validated, defaulted) policy spec into `merged`, strictest wins."""
    merged["required"] = sorted(set(merged["required"]) | set(spec["required"]), key=ALL_CHECKS.index)
    for section, fields in _STRICTNESS.items():
        for name, how in fields.items():
            merged[section][name] = _stricter(merged[section][name], spec[section][name], how)
    for section, name in _LOCATIONS.items():
        merged[section][name] = merged[section][name] or spec[section][name]
    prov = merged["provenance"]
    prov["allowedLicenses"] = _intersect_licenses(prov["allowedLicenses"], spec["provenance"]["allowedLicenses"])
    prov["requireConsentForPersonalData"] = (
        prov["requireConsentForPersonalData"] or spec["provenance"]["requireConsentForPersonalData"])


def _apply_job(merged: dict, job: dict) -> list[str]:
    """Apply the job's settings where they tighten; return a message for each one ignored.

    The API server fills in defaults of spec.governance, so a job value equal to the API
    default is probably not what the user wrote: it still applies when it tightens, but
    is ignored silently when it would loosen.
    """
    ignored: list[str] = []

    def loosening(path: str, value: Any, current: Any, default: Any) -> None:
        if value != default:
            ignored.append(f"spec.governance.{path}={value!r} would loosen the policy ({current!r}); ignored")

    if "required" in job:
        wanted = set(job["required"] or [])
        dropped = [c for c in merged["required"] if c not in wanted]
        if dropped and set(job["required"] or []) != set(_DEFAULTS["required"]):
            ignored.append(f"spec.governance.required omits {', '.join(dropped)} which the policy requires; "
                           "they stay required")
        merged["required"] = sorted(set(merged["required"]) | wanted, key=ALL_CHECKS.index)
    for section, fields in _STRICTNESS.items():
        for name, how in fields.items():
            if name not in (job.get(section) or {}):
                continue
            value, current = job[section][name], merged[section][name]
            if _is_tighter_or_equal(value, current, how):
                merged[section][name] = value
            else:
                loosening(f"{section}.{name}", value, current, _DEFAULTS[section][name])
    for section, name in _LOCATIONS.items():
        value = (job.get(section) or {}).get(name)
        if value and merged[section][name] and value != merged[section][name]:
            ignored.append(f"spec.governance.{section}.{name} cannot replace the policy's {merged[section][name]}; "
                           "ignored")
        elif value:
            merged[section][name] = value
    prov = job.get("provenance") or {}
    if "allowedLicenses" in prov:
        current = merged["provenance"]["allowedLicenses"]
        narrowed = _intersect_licenses(current, prov["allowedLicenses"] or [])
        extra = [x for x in prov["allowedLicenses"] or []
                 if current and x.casefold() not in {c.casefold() for c in current}]
        if extra:
            ignored.append(f"spec.governance.provenance.allowedLicenses adds {', '.join(extra)} which the policy "
                           "does not allow; ignored")
        merged["provenance"]["allowedLicenses"] = narrowed
    if "requireConsentForPersonalData" in prov:
        if prov["requireConsentForPersonalData"]:
            merged["provenance"]["requireConsentForPersonalData"] = True
        elif merged["provenance"]["requireConsentForPersonalData"]:
            loosening("provenance.requireConsentForPersonalData", False, True,
                      _DEFAULTS["provenance"]["requireConsentForPersonalData"])
    return ignored


def effective_policy(policies: list[dict], namespace: str,
                     job_governance: Optional[dict]) -> tuple[GovernanceSpec, list[str]]:
    """The policy a job in `namespace` runs under, and messages about job settings that were ignored.

    `policies` are GovernancePolicy objects as dicts. The operator passes DEFAULT_POLICY
    when the cluster has no GovernancePolicy; if none applies to the namespace, the API
    defaults (every check required) are used, never "no checks".
    """
    applicable = sorted((p for p in policies if applies_to(p, namespace)),
                        key=lambda p: (p.get("metadata") or {}).get("name", ""))
    specs = [GovernanceSpec.model_validate({k: v for k, v in (p.get("spec") or {}).items() if k != "namespaces"})
             .model_dump() for p in applicable] or [dict(_DEFAULTS)]
    merged = json.loads(json.dumps(specs[0]))  # deep copy
    for spec in specs[1:]:
        _merge_policy(merged, spec)
    messages = _apply_job(merged, job_governance) if job_governance else []
    return GovernanceSpec.model_validate(merged), messages


# ---------------------------------------------------------------------------------------------
# The governance report


def canonical_json(obj: Any) -> bytes:
    """The one serialization that report digests are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def statement_digest(envelope: Any) -> Optional[str]:
    """sha256 of a signed report's payload (the Statement as signed): what status records as reportDigest."""
    try:
        return "sha256:" + hashlib.sha256(base64.b64decode(envelope["payload"], validate=True)).hexdigest()
    except Exception:  # noqa: BLE001 - not an envelope: there is no digest to record
        return None


def policy_eval_sets(policies: list[dict], namespace: str) -> tuple[str, ...]:
    """The evalSetURI of every GovernancePolicy that applies to `namespace`, by policy name: what a
    Dataset there is decontaminated against (whichever policy a job ends up under)."""
    uris = []
    for policy in sorted((p for p in policies if applies_to(p, namespace)),
                         key=lambda p: (p.get("metadata") or {}).get("name", "")):
        uri = (((policy.get("spec") or {}).get("evaluation") or {}).get("evalSetURI"))
        if isinstance(uri, str) and uri and uri not in uris:
            uris.append(uri)
    return tuple(uris)


def policy_digest(policy: Optional[dict]) -> str:
    """sha256 of an effective policy, normalized through the API model (defaults filled in, unset
    fields dropped) so the operator's policy and the copy a report records hash alike."""
    try:
        normal = GovernanceSpec.model_validate(policy or {}).model_dump(mode="json", exclude_none=True)
    except Exception:  # a report with a malformed policy matches no real policy
        return "sha256:invalid"
    return "sha256:" + hashlib.sha256(canonical_json(normal)).hexdigest()


def report_uri(adapter_uri: str, run: int) -> str:
    """Each governance run's own report (governance.json next to the adapter is only the latest copy)."""
    return f"{adapter_uri.rstrip('/')}/governance/run-{run}.json"


@dataclass
class GovernanceOutcome:
    checks: list[CheckResult]
    passed: bool
    failing: list[str]
    message: str
    report_ok: bool
    required: list[str] = field(default_factory=list)
    key_id: Optional[str] = None  # the trusted key that signed the report


@dataclass(frozen=True)
class ReportBinding:
    """What this run's report must be bound to; None = not checked (e.g. not known yet)."""

    adapter_digest: str
    policy_digest: Optional[str] = None
    run: Optional[int] = None
    job_uid: Optional[str] = None
    dataset_digest: Optional[str] = None


def _binding_problems(stmt: dict, predicate: dict, bound: ReportBinding) -> list[str]:
    problems = []
    subjects = attestation.subject_digests(stmt)
    if subjects != [bound.adapter_digest]:
        problems.append(f"report is about adapter {', '.join(subjects)[:80] or 'none'}, not {bound.adapter_digest}")
    if bound.policy_digest is not None:
        if predicate.get("policyDigest") != bound.policy_digest:
            problems.append(f"report was produced under another policy ({str(predicate.get('policyDigest'))[:19]}, "
                            f"expected {bound.policy_digest[:19]})")
        elif policy_digest(predicate.get("policy")) != bound.policy_digest:
            problems.append("report's policy does not hash to its policyDigest")
    if bound.run is not None and predicate.get("run") != bound.run:
        problems.append(f"report belongs to governance run {str(predicate.get('run'))[:20]}, not run {bound.run}")
    job = predicate.get("job") if isinstance(predicate.get("job"), dict) else {}
    if bound.job_uid is not None and job.get("uid") != bound.job_uid:
        problems.append(f"report belongs to another FineTuneJob ({str(job.get('namespace'))[:63]}/"
                        f"{str(job.get('name'))[:63]}, uid {str(job.get('uid'))[:36]})")
    if bound.dataset_digest is not None and predicate.get("datasetDigest") != bound.dataset_digest:
        problems.append(f"report was computed on dataset {str(predicate.get('datasetDigest'))[:80]}, "
                        f"not {bound.dataset_digest}")
    return problems


def _untrusted(required: Optional[list[str]], message: str) -> GovernanceOutcome:
    """Nothing of an untrusted report is shown as a result: every required check failed, with why."""
    names = list(required if required is not None else CHECK_NAMES)
    checks = [CheckResult(name=n, passed=False, message=f"report not trusted: {message}") for n in names]
    return GovernanceOutcome(checks=checks, passed=False, failing=names, report_ok=False, required=names,
                             message=message)


def read_report(envelope: Any, bound: ReportBinding, keys: attestation.Keyring,
                required: Optional[list[str]] = None) -> GovernanceOutcome:
    """Verify a signed governance report and summarise its checks.

    The signature comes first: nothing in an envelope that no trusted key signed is believed,
    not even its list of checks (an untrusted report counts every required check as failed).
    Then the bindings: the report must be about this adapter, under this policy, for this run,
    of this FineTuneJob and dataset, or it is another run's evidence replayed here.
    `required` defaults to the checks the report's own policy requires; the operator passes its
    effective policy's list (a report run under a weaker policy then fails the checks it lacks).
    A required check missing from the report counts as failed.
    """
    try:
        stmt, signer = attestation.verify(envelope, keys)
    except attestation.AttestationError as exc:
        return _untrusted(required, f"report signature not valid: {exc}")
    predicate = stmt["predicate"]
    problems = _binding_problems(stmt, predicate, bound)
    if problems:  # genuine, but another run's evidence: none of its results count here
        return _untrusted(required, "; ".join(problems))
    if required is None:
        policy = predicate.get("policy") if isinstance(predicate.get("policy"), dict) else {}
        required = [n for n in policy.get("required") or CHECK_NAMES if n in ALL_CHECKS]
    checks: list[CheckResult] = []
    raw_checks = predicate.get("checks") if isinstance(predicate.get("checks"), list) else []
    for raw in raw_checks:
        try:
            checks.append(CheckResult.model_validate(raw))
        except Exception as exc:  # a malformed entry is a failure of the report, not a crash
            problems.append(f"malformed check entry: {str(exc).splitlines()[0][:200]}")
    by_name = {c.name: c for c in checks}
    for name in required:
        if name not in by_name:
            missing = CheckResult(name=name, passed=False, message="required check missing from the report")
            checks.append(missing)
            by_name[name] = missing
    failing = [name for name in required if not by_name[name].passed]
    report_ok = not problems
    passed = report_ok and not failing
    if not report_ok:
        message = "; ".join(problems)
    elif failing:
        message = "failed: " + "; ".join(f"{n}: {by_name[n].message}" if by_name[n].message else n for n in failing)
    else:
        message = f"all required checks passed ({', '.join(required)})"
    return GovernanceOutcome(checks=checks, passed=passed, failing=failing, message=message,
                             report_ok=report_ok, required=list(required), key_id=signer if report_ok else None)


# ---------------------------------------------------------------------------------------------
# Promotion


@dataclass
class PromotionDecision:
    state: str  # Promoted | AwaitingApproval | Blocked
    reason: str  # CamelCase
    message: str
    approved_by: Optional[str] = None
    promote: bool = False


def promotion_decision(outcome: GovernanceOutcome, promotion_spec: Optional[dict], adapter_digest: str,
                       manifest_ok: bool) -> PromotionDecision:
    """Whether to promote. Nothing (not even an approval) overrides a failed required check."""
    spec = promotion_spec or {}
    approval = spec.get("approval") or {}
    approved_digest = approval.get("digest")
    if not manifest_ok:
        return PromotionDecision("Blocked", "ManifestInvalid",
                                 "the adapter's files do not match its manifest; it cannot be promoted")
    if not outcome.report_ok:
        return PromotionDecision("Blocked", "ReportInvalid", f"governance report not trusted: {outcome.message}")
    if not outcome.passed:
        message = f"required checks failed: {', '.join(outcome.failing)} ({outcome.message})"
        if approved_digest:
            message += "; an approval cannot override a failed check"
        return PromotionDecision("Blocked", "GovernanceFailed", message)
    if spec.get("mode", "auto") == "auto":
        return PromotionDecision("Promoted", "GovernancePassed", outcome.message, promote=True)
    if not approved_digest:
        return PromotionDecision("AwaitingApproval", "AwaitingApproval",
                                 f"checks passed; waiting for spec.promotion.approval.digest={adapter_digest}")
    if approved_digest != adapter_digest:
        return PromotionDecision("AwaitingApproval", "ApprovalDigestMismatch",
                                 f"approval for {approved_digest} ignored: the adapter is {adapter_digest}")
    who = approval.get("approvedBy")
    return PromotionDecision("Promoted", "Approved",
                             f"approved{' by ' + who if who else ''} for {adapter_digest}; {outcome.message}",
                             approved_by=who, promote=True)


def approval_writer(metadata: dict) -> tuple[Optional[str], Optional[str]]:
    """(manager, time) of the newest managedFields entry that owns spec.promotion.approval.

    Kubernetes records which client (field manager) last wrote each field and when, not the
    user; this is as much as the API itself shows about who approved."""
    newest: Optional[dict] = None
    for entry in metadata.get("managedFields") or []:
        promotion = ((entry.get("fieldsV1") or {}).get("f:spec") or {}).get("f:promotion") or {}
        if "f:approval" in promotion and (newest is None or (entry.get("time") or "") >= (newest.get("time") or "")):
            newest = entry
    if newest is None:
        return None, None
    manager = newest.get("manager")
    if manager and newest.get("subresource"):
        manager = f"{manager} ({newest['subresource']})"
    return manager, newest.get("time")


def alias_uri(output_uri: str, alias: str, store: Optional[str] = None) -> str:
    """<store>/<alias>.json, or <output>/aliases/<alias>.json when no store is named."""
    folder = store.rstrip("/") if store else f"{output_uri.rstrip('/')}/aliases"
    return f"{folder}/{alias}.json"


def alias_record(namespace: str, name: str, adapter_uri: str, adapter_digest: str, passed: bool,
                 checks: list, now: str) -> dict:
    """What an alias file holds: the adapter it points at, who promoted it, and the check summary.
    `checks`: CheckResult models (a fresh report) or their status dicts (a re-promotion)."""
    def summary(c: Any) -> dict:
        c = c if isinstance(c, dict) else c.model_dump(mode="json")
        return {k: c.get(k) for k in ("name", "passed", "value", "threshold")}

    return {
        "adapterURI": adapter_uri,
        "adapterDigest": adapter_digest,
        "job": {"namespace": namespace, "name": name},
        "promotedAt": now,
        "governance": {"passed": passed, "checks": [summary(c) for c in checks]},
    }


#: Earlier adapters an alias record remembers (newest first): what a rollback goes back to.
ALIAS_HISTORY_LIMIT = 20


def _summary(record: dict) -> dict:
    keep = ("adapterURI", "adapterDigest", "job", "promotedAt")
    return {k: record[k] for k in keep if record.get(k) is not None}


def _history(record: Optional[dict]) -> list[dict]:
    """A stored record's history, with anything malformed dropped (the bucket is not trusted)."""
    history = (record or {}).get("history") if isinstance(record, dict) else None
    return [h for h in history if isinstance(h, dict) and isinstance(h.get("adapterDigest"), str)
            and isinstance(h.get("adapterURI"), str)] if isinstance(history, list) else []


def promoted_alias_record(current: Optional[dict], new: dict) -> dict:
    """`new` (alias_record) with the alias's history: what the alias pointed at before goes first."""
    history = _history(current)
    if isinstance(current, dict) and isinstance(current.get("adapterDigest"), str) and \
            current.get("adapterDigest") != new["adapterDigest"] and isinstance(current.get("adapterURI"), str):
        history = [_summary(current)] + history
    history = [h for h in history if h["adapterDigest"] != new["adapterDigest"]]
    return {**new, "history": history[:ALIAS_HISTORY_LIMIT]}


def rolled_back_alias_record(current: Optional[dict], digest: str, job: dict, now: str) -> Optional[dict]:
    """The alias record after `digest` is taken out of service, or None when nothing changes.

    When the alias points at `digest`, it goes back to the newest earlier adapter (or to none: a
    record without adapterDigest, so the history is kept). When it has moved on since, only the
    history entry goes."""
    if not isinstance(current, dict):
        return None
    history = _history(current)
    rest = [h for h in history if h["adapterDigest"] != digest]
    note = {"rolledBack": {"adapterDigest": digest, "job": job, "at": now}}
    if current.get("adapterDigest") == digest:
        if rest:
            return {**rest[0], "restoredAt": now, "history": rest[1:], **note}
        return {"adapterURI": None, "adapterDigest": None, "history": [], **note}
    if len(rest) == len(history):
        return None
    return {**current, "history": rest}
