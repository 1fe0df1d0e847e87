"""The provenance check's rules for a Dataset made by a SyntheticDataset (`provenance.synthetic`).

The chain, verified link by link from the files themselves (each rule a finding of its own):

- syntheticCandidates: candidates.jsonl (beside review.json) hashes to provenance.synthetic.candidatesDigest,
  and generation.json says the same digest and the same seed, base model, adapter and template digests;
- syntheticReview: review.json names those candidates and the reviewed file's bytes (reviewedDigest), with
  as many examples as the file has lines and no sampled candidate pending;
- syntheticLineage: every line of the reviewed file (the Dataset's source) carries the `synthetic.*` keys in
  its metadata (records.LINEAGE_KEYS) with the chain's digests and a review of accepted, edited or
  not-sampled;
- syntheticExamples: every line's id is a candidate; no rejected candidate is in; an accepted or
  not-sampled line is the candidate's example as generated, an edited line the reviewer's edit; accepted
  and edited lines have that decision on record (reviews/<id>.json), not-sampled ones were not sampled.
"""

from __future__ import annotations

import json
from typing import Optional

from finetune_operator.api.dataset import DatasetSpec, SyntheticOrigin
from finetune_operator.api.synthetic import ReviewDecision
from pydantic import ValidationError

from .. import storage
from ..errors import DataError
from ..synthesis import records
from ..synthesis.records import (ADAPTER_KEY, BASE_MODEL_KEY, ID_KEY, LINEAGE_KEYS, REVIEW_KEY, REVIEW_VALUES,
                                 REVIEWER_KEY, SEED_KEY, TEMPLATE_KEY)

#: Offending lines named per rule (then "and N more").
MAX_NAMED = 5

Finding = tuple[str, bool, str]


def _named(problems: list[str]) -> str:
    more = f"; and {len(problems) - MAX_NAMED} more" if len(problems) > MAX_NAMED else ""
    return "; ".join(problems[:MAX_NAMED]) + more


def _work_folder(review_uri: str) -> str:
    loc = storage.parse(review_uri)
    parent = loc.key.rsplit("/", 1)[0] if "/" in loc.key else ""
    return storage.Location(loc.scheme, loc.bucket, parent).uri


def _chain_digests(origin: SyntheticOrigin) -> dict[str, Optional[str]]:
    return {SEED_KEY: origin.seedDigest, BASE_MODEL_KEY: origin.baseModelDigest,
            ADAPTER_KEY: origin.generatorAdapterDigest, TEMPLATE_KEY: origin.templateDigest}


def _decision(work: str, cid: str) -> Optional[ReviewDecision]:
    uri = storage.join(work, records.REVIEWS, f"{cid}.json")
    try:
        return ReviewDecision.model_validate_json(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except ValidationError:
        raise DataError(f"{uri}: not a ReviewDecision") from None


def candidates_findings(origin: SyntheticOrigin, work: str) -> tuple[list[Finding], dict]:
    """syntheticCandidates, and the candidates by id (empty when they cannot be read)."""
    try:
        data = storage.read_bytes(storage.join(work, records.CANDIDATES))
    except FileNotFoundError:
        return [("syntheticCandidates", False, f"{storage.join(work, records.CANDIDATES)} not found")], {}
    digest = records.sha256_digest(data)
    if digest != origin.candidatesDigest:
        return [("syntheticCandidates", False, f"{records.CANDIDATES} has digest {digest}, provenance.synthetic "
                 f"says {origin.candidatesDigest} (changed after generation)")], {}
    try:
        candidates = {c.id: c for c in records.decode_candidates(data)}
        report = records.read_generation(work)
    except DataError as exc:
        return [("syntheticCandidates", False, str(exc))], {}
    if report is None:
        return [("syntheticCandidates", False, f"{records.GENERATION} not found in {work}")], candidates
    expected = _chain_digests(origin)
    said = {SEED_KEY: report.lineage.seedDigest, BASE_MODEL_KEY: report.lineage.baseModelDigest,
            ADAPTER_KEY: report.lineage.generatorAdapterDigest, TEMPLATE_KEY: report.lineage.templateDigest}
    wrong = [f"{key.split('.', 1)[1]} {said[key]} (provenance.synthetic: {expected[key]})"
             for key in expected if said[key] != expected[key]]
    if report.candidatesDigest != digest:
        wrong.insert(0, f"candidatesDigest {report.candidatesDigest} is not the file's {digest}")
    if wrong:
        return [("syntheticCandidates", False, f"{records.GENERATION} disagrees: " + _named(wrong))], candidates
    return [("syntheticCandidates", True, f"{len(candidates)} candidates, {digest}, generated from seed "
             f"{origin.seedDigest}")], candidates


def review_findings(origin: SyntheticOrigin, reviewed: bytes, lines: int) -> list[Finding]:
    try:
        review = json.loads(storage.read_bytes(origin.reviewURI))
        assert isinstance(review, dict)
    except FileNotFoundError:
        return [("syntheticReview", False, f"{origin.reviewURI} not found")]
    except (ValueError, AssertionError):
        return [("syntheticReview", False, f"{origin.reviewURI}: not a JSON object")]
    wrong = []
    if review.get("candidatesDigest") != origin.candidatesDigest:
        wrong.append(f"candidatesDigest {review.get('candidatesDigest')} (provenance.synthetic: "
                     f"{origin.candidatesDigest})")
    actual = records.sha256_digest(reviewed)
    if review.get("reviewedDigest") != actual:
        wrong.append(f"reviewedDigest {review.get('reviewedDigest')}, the source file is {actual}")
    if review.get("examples") != lines:
        wrong.append(f"examples {review.get('examples')}, the source file has {lines} lines")
    if review.get("pending"):
        wrong.append(f"{review.get('pending')} sampled candidates still pending review")
    if wrong:
        return [("syntheticReview", False, f"{origin.reviewURI} does not match: " + _named(wrong))]
    return [("syntheticReview", True, f"review {review.get('reviewed')} of {review.get('required')} sampled, "
             f"{review.get('accepted', 0) + review.get('edited', 0)} accepted; {lines} examples")]


def _content(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "metadata"}


def line_findings(origin: SyntheticOrigin, work: str, text: str, candidates: dict) -> list[Finding]:
    """syntheticLineage and syntheticExamples over every line of the reviewed file."""
    expected = _chain_digests(origin)
    lineage_problems: list[str] = []
    example_problems: list[str] = []
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        count += 1
        try:
            record = json.loads(line)
            meta = record.get("metadata") if isinstance(record, dict) else None
        except ValueError:
            lineage_problems.append(f"line {number}: not JSON")
            continue
        if not isinstance(meta, dict) or any(key not in meta for key in LINEAGE_KEYS):
            missing = [k for k in LINEAGE_KEYS if not isinstance(meta, dict) or k not in meta]
            lineage_problems.append(f"line {number}: no lineage ({', '.join(missing[:3])}"
                                    f"{' …' if len(missing) > 3 else ''} missing)")
            continue
        off = [f"{key} {meta[key]!s:.80}" for key in expected if meta[key] != expected[key]]
        if meta[REVIEW_KEY] not in REVIEW_VALUES:
            off.append(f"{REVIEW_KEY} {str(meta[REVIEW_KEY])[:40]!r}")
        if off:
            lineage_problems.append(f"line {number}: " + ", ".join(off) + " (not this chain's)")
            continue
        cid, how = meta[ID_KEY], meta[REVIEW_KEY]
        candidate = candidates.get(cid) if isinstance(cid, str) else None
        if candidate is None:
            example_problems.append(f"line {number}: id {str(cid)[:20]!r} is not a candidate")
            continue
        try:
            decision = _decision(work, cid)
        except DataError as exc:
            example_problems.append(f"line {number}: {exc}")
            continue
        content = _content(record)
        if decision is not None and decision.verdict == "rejected":
            example_problems.append(f"line {number}: candidate {cid} was rejected by {decision.reviewer[:60]}")
        elif how == "edited":
            if decision is None or decision.verdict != "edited" or _content(decision.example or {}) != content:
                example_problems.append(f"line {number}: candidate {cid} is marked edited but is not the "
                                        "recorded edit")
        elif content != candidate.example:
            example_problems.append(f"line {number}: candidate {cid} differs from the example generated")
        elif how == "accepted" and (decision is None or decision.verdict != "accepted"):
            example_problems.append(f"line {number}: candidate {cid} is marked accepted but no acceptance is "
                                    "recorded")
        elif how == "not-sampled" and (decision is not None or candidate.reviewRequired):
            example_problems.append(f"line {number}: candidate {cid} is marked not-sampled but was sampled for "
                                    "review")
        elif how != "not-sampled" and decision is not None and meta[REVIEWER_KEY] != decision.reviewer:
            example_problems.append(f"line {number}: reviewer {str(meta[REVIEWER_KEY])[:60]!r} is not the "
                                    f"recorded {decision.reviewer[:60]!r}")
    out = [("syntheticLineage", not lineage_problems,
            _named(lineage_problems) if lineage_problems else f"all {count} lines carry this chain's lineage")]
    if candidates:
        out.append(("syntheticExamples", not example_problems,
                    _named(example_problems) if example_problems else
                    f"all {count} lines are reviewed or unsampled candidates, none rejected"))
    else:
        out.append(("syntheticExamples", False, "not checked: the candidates cannot be trusted (syntheticCandidates)"))
    return out


def synthetic_findings(spec: DatasetSpec) -> list[Finding]:
    """Every syntheticX finding for a Dataset whose provenance.synthetic is set ([] otherwise)."""
    origin = spec.provenance.synthetic
    if origin is None:
        return []
    work = _work_folder(origin.reviewURI)
    findings, candidates = candidates_findings(origin, work)
    try:
        reviewed = storage.read_bytes(spec.source.uri)
    except (FileNotFoundError, IsADirectoryError):
        return findings + [(rule, False, f"the source {spec.source.uri} is not the reviewed file (not found)")
                           for rule in ("syntheticReview", "syntheticLineage", "syntheticExamples")]
    try:
        text = reviewed.decode("utf-8")
    except UnicodeDecodeError:
        return findings + [(rule, False, f"the source {spec.source.uri} is not UTF-8")
                           for rule in ("syntheticReview", "syntheticLineage", "syntheticExamples")]
    lines = sum(1 for line in text.splitlines() if line.strip())
    return findings + review_findings(origin, reviewed, lines) + line_findings(origin, work, text, candidates)
