"""The work folder's records, shared by `synthesize`, `synthesis-finalize` (review.py) and the provenance check.

One place says how a candidate is named (its id), how candidates.jsonl and generation.json are written
and read, and which flat `synthetic.*` metadata keys carry an example's lineage in reviewed.jsonl.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from finetune_operator.api.synthetic import GenerationReport, Lineage, SyntheticCandidate
from pydantic import ValidationError

from .. import storage
from ..errors import DataError

CANDIDATES = "candidates.jsonl"
GENERATION = "generation.json"
REVIEWS = "reviews"
REVIEWED = "reviewed.jsonl"
REVIEW_STATS = "review.json"

#: The lineage keys every line of reviewed.jsonl carries in its `metadata` (flat: Dataset metadata is flat).
ID_KEY = "synthetic.id"
SEED_KEY = "synthetic.seedDigest"
BASE_MODEL_KEY = "synthetic.baseModelDigest"
ADAPTER_KEY = "synthetic.generatorAdapterDigest"
TEMPLATE_KEY = "synthetic.templateDigest"
REVIEW_KEY = "synthetic.review"  # accepted | edited | not-sampled
REVIEWER_KEY = "synthetic.reviewer"  # who decided; "" for not-sampled
LINEAGE_KEYS = (ID_KEY, SEED_KEY, BASE_MODEL_KEY, ADAPTER_KEY, TEMPLATE_KEY, REVIEW_KEY, REVIEWER_KEY)
REVIEW_VALUES = ("accepted", "edited", "not-sampled")


def canonical_json(obj) -> str:
    """The one JSON spelling of a value: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def candidate_id(example: dict) -> str:
    """First 16 hex digits of the sha256 of the example's canonical JSON (the example without metadata)."""
    return hashlib.sha256(canonical_json(example).encode("utf-8")).hexdigest()[:16]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def lineage_metadata(candidate_id_: str, lineage: Lineage, review: str, reviewer: str = "") -> dict:
    """The `synthetic.*` metadata of one reviewed line. `candidate_id_` is the candidate's id (an edited
    example keeps the id of the candidate it was edited from)."""
    if review not in REVIEW_VALUES:
        raise ValueError(f"review must be one of {', '.join(REVIEW_VALUES)}, got {review!r}")
    return {ID_KEY: candidate_id_, SEED_KEY: lineage.seedDigest, BASE_MODEL_KEY: lineage.baseModelDigest,
            ADAPTER_KEY: lineage.generatorAdapterDigest, TEMPLATE_KEY: lineage.templateDigest,
            REVIEW_KEY: review, REVIEWER_KEY: reviewer}


# --- candidates.jsonl -----------------------------------------------------------------------------------

def encode_candidates(candidates: list[SyntheticCandidate]) -> bytes:
    """candidates.jsonl's bytes: one canonical JSON line per candidate, in order (same candidates, same bytes)."""
    return "".join(canonical_json(c.model_dump(mode="json")) + "\n" for c in candidates).encode("utf-8")


def decode_candidates(data: bytes, where: str = CANDIDATES) -> list[SyntheticCandidate]:
    """Parse candidates.jsonl; a bad line is a DataError naming the line and field."""
    out = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(SyntheticCandidate.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} line {number}: not JSON ({exc.msg})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "line"
            raise DataError(f"{where} line {number}: {field}: {err['msg']}") from None
    return out


def write_candidates(work_uri: str, candidates: list[SyntheticCandidate]) -> str:
    """Write candidates.jsonl in one piece (atomic per object); returns its digest."""
    data = encode_candidates(candidates)
    storage.write_bytes(storage.join(work_uri, CANDIDATES), data)
    return sha256_digest(data)


def read_candidates(work_uri: str) -> tuple[list[SyntheticCandidate], str]:
    """The candidates and the digest of the file as read."""
    data = storage.read_bytes(storage.join(work_uri, CANDIDATES))
    return decode_candidates(data), sha256_digest(data)


# --- generation.json ------------------------------------------------------------------------------------

def write_generation(work_uri: str, report: GenerationReport) -> None:
    """generation.json, written after candidates.jsonl: its presence means the generation is complete."""
    storage.write_text(storage.join(work_uri, GENERATION),
                       json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")


def read_generation(work_uri: str) -> Optional[GenerationReport]:
    """The GenerationReport, or None when the generation has not completed."""
    uri = storage.join(work_uri, GENERATION)
    if not storage.exists(uri):
        return None
    try:
        return GenerationReport.model_validate_json(storage.read_bytes(uri))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "file"
        raise DataError(f"{GENERATION}: {field}: {err['msg']}") from None
