"""`ftctl report`'s lines for the attribution heatmaps of a vision-language adapter's explainability check.

The check's report (reports/explainability.json) lists one PNG overlay per sampled image beside it
(reports/explain-N.png) and an HTML page showing them; these lines name them, with the hottest patch,
so a reviewer can open the pictures. Read with the trainer's storage (s3:// or file://, the same
credentials as `ftctl lineage`); a report that cannot be read is named, not fatal.
"""

from __future__ import annotations

import json
from typing import Any, Iterable


def heatmap_lines(checks: Iterable[Any]) -> list[str]:
    from finetune_trainer import storage

    out: list[str] = []
    for check in checks:
        get = check.get if isinstance(check, dict) else lambda k, c=check: getattr(c, k, None)
        uri = get("reportURI") or ""
        if get("name") != "explainability" or not uri.endswith("explainability.json"):
            continue
        try:
            report = json.loads(storage.read_bytes_limited(uri, 16 << 20))
        except Exception as exc:  # noqa: BLE001 - no access, gone, not JSON: say so and go on
            out.append(f"explainability report {uri}: not readable here ({type(exc).__name__})")
            continue
        samples = [s for s in report.get("samples") or [] if isinstance(s, dict) and s.get("imageURI")]
        if not samples:
            continue
        out.append(f"attribution heatmaps ({report.get('method', '?')}): {uri[:-len('.json')]}.html")
        for n, sample in enumerate(samples, start=1):
            hot = sample.get("hottestPatch") or {}
            share = hot.get("share")
            shown = f"{share:.0%}" if isinstance(share, (int, float)) else "?"
            out.append(f"  image {n}: {sample['imageURI']}  hottest patch row {hot.get('row')}, "
                       f"column {hot.get('col')} ({shown} of the attribution)")
    return out
