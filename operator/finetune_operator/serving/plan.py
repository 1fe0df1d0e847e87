"""Which serving targets need work, and what their status says afterwards. No I/O here.

A target mirrors the alias: its wanted state is `status.promotion.served` (the adapter the alias
points at after this job's last alias write, or none after a rollback to nothing). A target is in
sync when its status records that digest for the same target spec; anything else is due, unless a
failed attempt's backoff has not run out yet.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Optional

from ..api.serving import PromotionTarget, ServedAdapter
from ..conditions import bounded, set_condition

#: Seconds before the next attempt after 1, 2, 3, ... failures in a row (then the last, forever).
BACKOFF_SECONDS = (10, 30, 60, 120, 300, 600)
PUBLISHED = "Published"


@dataclass
class Outcome:
    """What one publisher did: ok with a reference (what it wrote), or a failure message."""

    ok: bool
    message: str
    reference: Optional[str] = None


def target_digest(target: PromotionTarget) -> str:
    """Identifies the target's spec: an edited target is published again."""
    raw = json.dumps(target.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def served_of(status: dict) -> Optional[ServedAdapter]:
    served = (status.get("promotion") or {}).get("served")
    return ServedAdapter.model_validate(served) if served is not None else None


def _parse(ts: Optional[str]) -> Optional[datetime.datetime]:
    if not ts:
        return None
    try:
        return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def _entry(status: dict, name: str) -> dict:
    for entry in (status.get("promotion") or {}).get("targets") or []:
        if entry.get("name") == name:
            return entry
    return {}


def in_sync(entry: dict, target: PromotionTarget, served: ServedAdapter) -> bool:
    wanted_state = "Published" if served.digest else "Unpublished"
    return (entry.get("state") == wanted_state and entry.get("adapterDigest") == served.digest
            and entry.get("targetDigest") == target_digest(target))


def due(targets: list[PromotionTarget], status: dict, now: str) -> list[PromotionTarget]:
    """The targets to publish to now."""
    served = served_of(status)
    if served is None:
        return []
    moment = _parse(now)
    out = []
    for target in targets:
        entry = _entry(status, target.name)
        if in_sync(entry, target, served):
            continue
        retry_at = _parse(entry.get("nextAttemptAt")) if entry.get("state") == "Retrying" else None
        if retry_at is not None and moment is not None and retry_at > moment:
            continue
        out.append(target)
    return out


def next_wakeup(status: dict) -> Optional[str]:
    """The earliest backoff deadline among retrying targets (when to reconcile again)."""
    times = [e["nextAttemptAt"] for e in (status.get("promotion") or {}).get("targets") or []
             if e.get("state") == "Retrying" and e.get("nextAttemptAt")]
    return min(times) if times else None


def record(status: dict, target: PromotionTarget, outcome: Outcome, generation: int, now: str) -> tuple[str, str]:
    """Fold one attempt into status.promotion.targets; returns the Event (type, reason) to post."""
    served = served_of(status) or ServedAdapter()
    promo = status.setdefault("promotion", {})
    entries = [e for e in promo.get("targets") or [] if e.get("name") != target.name]
    entry = dict(_entry(status, target.name)) or {"name": target.name}
    entry.update(kind=target.kind, targetDigest=target_digest(target))
    if outcome.ok:
        entry.update(state="Published" if served.digest else "Unpublished", adapterDigest=served.digest,
                     reference=outcome.reference, attempts=0)
        entry.pop("nextAttemptAt", None)
        if entry.get("adapterDigest") is None:
            entry.pop("adapterDigest")
        reason = "Published" if served.digest else "Unpublished"
        value: bool | str = True
        event = ("Normal", reason)
    else:
        attempts = int(entry.get("attempts") or 0) + 1
        delay = BACKOFF_SECONDS[min(attempts, len(BACKOFF_SECONDS)) - 1]
        moment = _parse(now) or datetime.datetime.now(datetime.timezone.utc)
        entry.update(state="Retrying", attempts=attempts,
                     nextAttemptAt=(moment + datetime.timedelta(seconds=delay)).strftime("%Y-%m-%dT%H:%M:%SZ"))
        reason, value, event = "PublishFailed", False, ("Warning", "PublishFailed")
    entry["conditions"] = set_condition(entry.get("conditions") or [], PUBLISHED, value, reason,
                                        bounded(outcome.message), generation, now)
    order = {t: i for i, t in enumerate(e.get("name") for e in promo.get("targets") or [])}
    entries.append({k: v for k, v in entry.items() if v is not None})
    promo["targets"] = sorted(entries, key=lambda e: order.get(e["name"], len(order)))
    return event


def pending_entries(targets: list[PromotionTarget], status: dict) -> None:
    """A Pending entry for every target that has none yet (right after a promotion or rollback)."""
    promo = status.setdefault("promotion", {})
    entries = list(promo.get("targets") or [])
    names = {e.get("name") for e in entries}
    for target in targets:
        if target.name not in names:
            entries.append({"name": target.name, "kind": target.kind, "state": "Pending"})
    spec_names = {t.name for t in targets}
    # A target removed from the spec keeps nothing in status (what it published stays: docs/serving.md).
    promo["targets"] = [e for e in entries if e.get("name") in spec_names]


def published_condition(targets: list[PromotionTarget], status: dict) -> tuple[bool | str, str, str]:
    """The job's aggregate Published condition: (status, reason, message)."""
    served = served_of(status)
    if not targets or served is None:
        return "Unknown", "NoTargets", "no serving targets"
    lagging = [t for t in targets if not in_sync(_entry(status, t.name), t, served)]
    if not lagging:
        verb = f"serve {served.digest}" if served.digest else "serve nothing for the alias (rolled back)"
        return True, "AllPublished", f"{len(targets)} target(s) {verb}"
    failing = [t.name for t in lagging if _entry(status, t.name).get("state") == "Retrying"]
    if failing:
        details = "; ".join(f"{name}: {((_entry(status, name).get('conditions') or [{}])[0]).get('message', '')}"
                            for name in failing)
        return False, "PublishFailed", f"retrying {', '.join(failing)}: {details}"
    return "Unknown", "Publishing", f"publishing to {', '.join(t.name for t in lagging)}"


def fold(status: dict, targets: list[PromotionTarget], results: list[tuple[PromotionTarget, Outcome]],
         generation: int, now: str) -> list[tuple[str, str, str]]:
    """Record each attempt and set the job's Published condition; the Events to post."""
    events = []
    for target, outcome in results:
        type_, reason = record(status, target, outcome, generation, now)
        events.append((type_, reason, f"target {target.name}: {outcome.message}"))
    value, reason, message = published_condition(targets, status)
    status["conditions"] = set_condition(status.get("conditions") or [], PUBLISHED, value, reason, message,
                                         generation, now)
    return events
