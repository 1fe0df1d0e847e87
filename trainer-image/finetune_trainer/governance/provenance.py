"""provenance: may this data be used, is it still the data that was validated, is the adapter intact?

Rules, each a finding of its own (the check passes only when none fails):

- origin: the Dataset says where the data came from;
- license: declared, and in `allowedLicenses` when that list is non-empty (case-insensitive);
- consent: `consent: obtained` when `containsPersonalData` and `requireConsentForPersonalData`;
- dataset digest: the Dataset's CURRENT source, validated again with the same pure function
  as the validation Job (validate.validate_text), has the digest the adapter was trained on
  (config.data.digest, also recorded in the adapter's manifest). Data edited after
  validation, or a source that no longer validates, fails;
- base model digest: the base model folder's digest is computed and recorded; it must equal
  the digest the job declared (baseModel.digest / governanceInputs.baseModelDigest) or the
  one in the adapter manifest, when one was declared;
- adapter manifest: every adapter file matches manifest.json (adapter.verify);
- synthetic data (`provenance.synthetic`, a SyntheticDataset's Dataset): the chain from the seed and the
  generator through the candidates and the review to every line of the data (synthetic_chain.py:
  syntheticCandidates, syntheticReview, syntheticLineage, syntheticExamples).
"""

from __future__ import annotations

import json

from finetune_operator.api.governance import CheckResult
from finetune_operator.governance import NO_LICENSE_ALLOWED

from .. import storage
from .base import CheckContext, failed
from .synthetic_chain import synthetic_findings


def declaration_findings(provenance, rules) -> list[tuple[str, bool, str]]:
    """(rule, ok, message) for what the Dataset declares: origin, license, consent. Pure."""
    out = []
    origin = (provenance.origin or "").strip()
    out.append(("origin", bool(origin), f"origin {origin!r}" if origin else "no origin declared"))
    license_ = (provenance.license or "").strip()
    allowed = [x for x in rules.allowedLicenses if x != NO_LICENSE_ALLOWED]
    if not license_:
        out.append(("license", False, "no license declared"))
    elif rules.allowedLicenses and license_.casefold() not in {x.casefold() for x in allowed}:
        listed = ", ".join(allowed) or "none (the policies that apply allow no common license)"
        out.append(("license", False, f"license {license_!r} is not allowed (allowed: {listed})"))
    else:
        out.append(("license", True, f"license {license_!r}"))
    if provenance.containsPersonalData and rules.requireConsentForPersonalData:
        ok = provenance.consent == "obtained"
        out.append(("consent", ok, f"personal data with consent {provenance.consent!r}"
                    + ("" if ok else "; consent: obtained is required")))
    else:
        out.append(("consent", True, f"consent {provenance.consent!r} "
                    f"(personal data: {'yes' if provenance.containsPersonalData else 'no'})"))
    return out


def current_dataset_digest(spec, eval_set_uris=()) -> tuple[str | None, str]:
    """Validate the Dataset's source as it is now (decontaminated against the same evaluation files
    as the validation Job: `eval_set_uris`); (digest or None, message)."""
    from ..validate import validate_source

    # Streamed like the validation Job (bounded memory; a tolerated non-UTF-8 line is a dropped line here too).
    result = validate_source(spec, eval_set_uris=eval_set_uris)
    return result.digest, result.message


class ProvenanceCheck:
    name = "provenance"

    def run(self, ctx: CheckContext) -> CheckResult:
        from ..adapter import MANIFEST, verify

        spec = ctx.inputs.dataset
        findings = declaration_findings(spec.provenance, ctx.policy.provenance)
        findings += synthetic_findings(spec)
        manifest = {}
        try:
            manifest = json.loads(storage.read_text(storage.join(ctx.adapter_uri, MANIFEST)))
        except (FileNotFoundError, ValueError):
            pass  # adapter.verify below reports it

        trained_on = ctx.config.data.digest
        try:
            current, why = current_dataset_digest(spec, ctx.inputs.datasetEvalSetURIs)
        except FileNotFoundError as exc:
            current, why = None, f"source not found: {exc}"
        if not trained_on:
            findings.append(("datasetDigest", False, "no training-time dataset digest recorded (data.digest)"))
        elif current is None:
            findings.append(("datasetDigest", False, f"the current source no longer validates: {why}"))
        elif current != trained_on:
            findings.append(("datasetDigest", False, f"dataset changed since training: trained on {trained_on}, "
                             f"the source now validates to {current}"))
        else:
            findings.append(("datasetDigest", True, f"dataset digest {current} unchanged"))
        recorded = (manifest.get("dataset") or {}).get("digest")
        if recorded and trained_on and recorded != trained_on:
            findings.append(("datasetDigest", False, f"adapter manifest records dataset {recorded}, "
                             f"the job says {trained_on}"))

        from ..storage import folder_digest

        base_digest = folder_digest(ctx.base_model_dir)
        ctx.base_model_digest = base_digest
        declared = {d for d in (ctx.config.baseModel.digest, ctx.inputs.baseModelDigest,
                                (manifest.get("baseModel") or {}).get("digest")) if d}
        if declared - {base_digest}:
            findings.append(("baseModelDigest", False, f"base model digest {base_digest} differs from the declared "
                             f"{', '.join(sorted(declared - {base_digest}))}"))
        else:
            findings.append(("baseModelDigest", True, f"base model digest {base_digest} recorded"))

        ok, why = verify(ctx.adapter_uri)
        findings.append(("adapterManifest", ok, why))

        report = {"findings": [{"rule": r, "passed": ok_, "message": m} for r, ok_, m in findings],
                  "declared": spec.provenance.model_dump(), "allowedLicenses": ctx.policy.provenance.allowedLicenses,
                  "datasetDigest": {"trainedOn": trained_on, "current": current},
                  "baseModelDigest": base_digest}
        uri = ctx.write_report("provenance.json", report)
        bad = [f"{r}: {m}" for r, ok_, m in findings if not ok_]
        if bad:
            return failed(self.name, "; ".join(bad), value=float(len(bad)), threshold=0.0, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=0.0, threshold=0.0, reportURI=uri,
                           message=f"{len(findings)} provenance rules hold (license {spec.provenance.license!r}, "
                           f"dataset {current})")
