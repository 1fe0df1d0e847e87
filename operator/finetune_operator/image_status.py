"""What a validation report's image stats (format image-text) may put into a Dataset's status.

report.json is written by the validation pod from user data: every field is bounded and typed here,
and a report that does not fit the API type puts nothing in status (never an invalid status).
"""

from __future__ import annotations

from typing import Any, Optional

from .api.images import SIDE_BUCKETS, ImageStats
from .conditions import bounded
from .curation_status import _counts, _int


def image_stats(raw: Any) -> Optional[dict]:
    """The report's stats.images, bounded (None when absent or not an object)."""
    if not isinstance(raw, dict):
        return None
    sides = raw.get("sideHistogram") if isinstance(raw.get("sideHistogram"), list) else []
    out = {
        "images": _int(raw.get("images")), "distinct": _int(raw.get("distinct")), "bytes": _int(raw.get("bytes")),
        "formats": _counts(raw.get("formats"), 16), "modes": _counts(raw.get("modes"), 16),
        "sideHistogram": [{"le": b["le"], "count": _int(b.get("count"))} for b in sides[:len(SIDE_BUCKETS)]
                          if isinstance(b, dict) and b.get("le") in SIDE_BUCKETS],
        "standardised": bounded(raw["standardised"], 64) if isinstance(raw.get("standardised"), str) else None,
    }
    try:
        return ImageStats.model_validate(out).model_dump(exclude_none=True)
    except ValueError:
        return None
