"""What a validation report's curation stats may put into a Dataset's status, the SmallDataset
condition, and the group counts of training.balance a trainer's result.json puts into a
FineTuneJob's status. Pure functions: the report is shaped by the user's data (and written by a pod), so
every list is cut to the API's bounds and every string clipped before it reaches status.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from .api.balance import MAX_GROUPS, BalanceReport
from .api.curation import (MAX_EVAL_SETS_USED, MAX_STATUS_EXAMPLES, MAX_STATUS_GROUPS, MAX_STATUS_LINES, STEPS,
                           CurationStats)
from .conditions import bounded, set_condition

SMALL_DATASET = "SmallDataset"
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _counts(rows: Any, limit: int) -> list[dict]:
    return [{"name": bounded(r.get("name"), 128), "count": _int(r.get("count"))}
            for r in (rows if isinstance(rows, list) else [])[:limit] if isinstance(r, dict)]


def curation_stats(raw: Any) -> Optional[dict]:
    """The report's stats.curation, bounded (None when absent or not an object)."""
    if not isinstance(raw, dict):
        return None
    steps = []
    for row in (raw.get("steps") if isinstance(raw.get("steps"), list) else [])[:len(STEPS)]:
        if isinstance(row, dict) and row.get("step") in STEPS and row["step"] not in {r["step"] for r in steps}:
            lines = row.get("lines") if isinstance(row.get("lines"), list) else []
            examples = row.get("examples") if isinstance(row.get("examples"), list) else []
            steps.append({"step": row["step"], "removed": _int(row.get("removed")),
                          "lines": [_int(n) for n in lines[:MAX_STATUS_LINES]],
                          "examples": [bounded(e, 240) for e in examples[:MAX_STATUS_EXAMPLES]]})
    duplicates = raw.get("duplicates") if isinstance(raw.get("duplicates"), dict) else {}
    histogram = raw.get("tokenHistogram") if isinstance(raw.get("tokenHistogram"), list) else []
    uris = raw.get("evalSetURIs") if isinstance(raw.get("evalSetURIs"), list) else []
    digest = raw.get("settingsDigest")
    out = {
        "settingsDigest": digest if isinstance(digest, str) and _DIGEST.match(digest) else None,
        "steps": steps,
        "duplicates": {k: _int(duplicates.get(k)) for k in ("exact", "near", "eval")},
        "tokenHistogram": [{"le": b.get("le") if isinstance(b.get("le"), int) else -1, "count": _int(b.get("count"))}
                           for b in histogram[:24] if isinstance(b, dict)],
        "sources": _counts(raw.get("sources"), MAX_STATUS_GROUPS),
        "tags": _counts(raw.get("tags"), MAX_STATUS_GROUPS),
        "evalSetURIs": [bounded(u, 2048) for u in uris[:MAX_EVAL_SETS_USED] if isinstance(u, str)],
        "removedURI": bounded(raw["removedURI"], 2048) if isinstance(raw.get("removedURI"), str) else None,
        "tokenCount": bounded(raw.get("tokenCount") or "", 256),
    }
    try:
        return CurationStats.model_validate(out).model_dump(exclude_none=True)
    except ValueError:
        return None


def with_small_dataset(conditions: list[dict], examples: int, recommended: int, generation: int,
                       now: str) -> list[dict]:
    """SmallDataset: a warning (True) below `recommended` training examples, never a failure."""
    if examples < recommended:
        return set_condition(conditions, SMALL_DATASET, True, "BelowRecommendedSize",
                             f"{examples} training examples; at least {recommended} are recommended "
                             "(spec.curation.recommendedExamples)", generation, now)
    return set_condition(conditions, SMALL_DATASET, False, "RecommendedSize",
                         f"{examples} training examples (at least {recommended} recommended)", generation, now)


def without_small_dataset(conditions: list[dict]) -> list[dict]:
    return [c for c in conditions or [] if c.get("type") != SMALL_DATASET]


def balance_status(raw: Any) -> Optional[dict]:
    """result.json's balance counts, bounded (None when absent or malformed)."""
    if not isinstance(raw, dict):
        return None
    groups = raw.get("groups") if isinstance(raw.get("groups"), list) else []
    try:
        return BalanceReport.model_validate({
            "before": _int(raw.get("before")), "after": _int(raw.get("after")), "seed": _int(raw.get("seed")),
            "groups": [{"name": bounded(g.get("name"), 128), "before": _int(g.get("before")),
                        "after": _int(g.get("after")),
                        "weight": g["weight"] if isinstance(g.get("weight"), (int, float)) and g["weight"] >= 0 else 1.0}
                       for g in groups[:MAX_GROUPS] if isinstance(g, dict)]}).model_dump(mode="json")
    except ValueError:
        return None
