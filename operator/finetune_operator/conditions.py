"""Standard conditions (metav1.Condition shape), computed without touching the cluster."""

from __future__ import annotations

import datetime
from typing import Optional


def now_iso(now: Optional[datetime.datetime] = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: The longest message copied into a status or an Event (characters). Messages come from pods,
#: Jobs, the API server and reports a user's data shapes: a 4 MB one would make the status patch
#: exceed the API server's request limit, and the object would never leave its phase.
MESSAGE_LIMIT = 1024


def bounded(message: object, limit: int = MESSAGE_LIMIT) -> str:
    """`message` cut to at most `limit` characters, saying how much was left out. Idempotent (a
    bounded message is returned as it is), so comparing a new message with the stored one works."""
    text = str(message)
    if len(text) <= limit:
        return text
    suffix = f"… {len(text)} characters in all"
    return text[:max(limit - len(suffix), 0)] + suffix


def set_condition(conditions: list[dict], type_: str, status: bool | str, reason: str, message: str,
                  generation: int, now: str) -> list[dict]:
    """Return a new list with one condition set.

    lastTransitionTime only moves when the status flips, as the Kubernetes API conventions ask,
    so a reason or message update does not look like a new transition.
    """
    status_str = status if isinstance(status, str) else ("True" if status else "False")
    message = bounded(message)
    out: list[dict] = []
    found = False
    for cond in conditions or []:
        if cond.get("type") == type_:
            found = True
            changed = cond.get("status") != status_str
            cond = {
                "type": type_, "status": status_str, "reason": reason, "message": message,
                "lastTransitionTime": now if changed else cond.get("lastTransitionTime", now),
                "observedGeneration": generation,
            }
        out.append(cond)
    if not found:
        out.append({"type": type_, "status": status_str, "reason": reason, "message": message,
                    "lastTransitionTime": now, "observedGeneration": generation})
    return out


def get_condition(conditions: list[dict], type_: str) -> Optional[dict]:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict], type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return bool(cond and cond.get("status") == "True")
