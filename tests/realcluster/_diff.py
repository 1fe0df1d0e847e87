"""Verdicts on a manifest from the real API server and from api/validation.py, in one comparable shape.

The server's verdict comes from a create with dryRun=All and fieldValidation=Strict (what `kubectl
apply` does by default): nothing is stored, and every object gets its own verdict, so many can be
sent at once from a thread pool. A rejection's field paths come from the Status' causes (422), or
from the strict decoder's message (400: unknown fields, reported before any other check).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from finetune_operator.api import KINDS
from finetune_operator.api.meta import GROUP, VERSION
from finetune_operator.api.validation import ManifestError, validate_manifest

_KINDS = {k.KIND: k for k in KINDS}
#: A cause the server adds when it skipped CEL rules because of schema errors (no field of its own).
_SKIPPED_CEL = "some validation rules were not checked"


@dataclass
class Verdict:
    accepted: bool
    fields: frozenset[str] = frozenset()
    messages: tuple[str, ...] = ()
    #: The object as the server (or we) would store it: defaults applied. Only when accepted.
    obj: Optional[dict] = field(default=None, compare=False)

    def short(self) -> str:
        if self.accepted:
            return "accepted"
        return "rejected " + json.dumps(sorted(self.fields)) + " " + json.dumps(list(self.messages))[:1500]


def _normalize(path: str) -> str:
    """`spec.tolerations[0].key`, as both sides write it (the server's CEL paths may lead with a dot)."""
    return path.strip().lstrip(".")


def _fields_of_status(status: dict) -> tuple[set[str], list[str]]:
    details = status.get("details") or {}
    fields, messages = set(), []
    for cause in details.get("causes") or []:
        message = cause.get("message", "")
        if _SKIPPED_CEL in message:
            continue
        messages.append(f"{cause.get('field', '')}: {message}")
        if cause.get("field") and cause["field"] != "<nil>":
            fields.add(_normalize(cause["field"]))
        elif (m := re.search(r"must be of type integer \(default format\) in (\S+)", message)):
            fields.add(_normalize(m.group(1)))  # the int64 format check names its field in the message
    text = status.get("message", "")
    # A metadata field of the wrong type fails decoding into ObjectMeta: the message names it.
    for go_field in re.findall(r"Go struct field ObjectMeta\.(\w+)", text):
        fields.add(f"metadata.{go_field}")
    if "Go value of type v1.ObjectMeta" in text:
        fields.add("metadata")
    if not fields and "strict decoding error" in text:
        fields |= {_normalize(m) for m in re.findall(r'unknown field "([^"]+)"', text)}
        fields |= {_normalize(m) for m in re.findall(r'duplicate field "([^"]+)"', text)}
        messages.append(text)
    if not messages:
        messages.append(text)
    return fields, messages


def server_verdict(api_client, manifest: dict, namespace: str) -> Verdict:
    """The real API server's verdict (dryRun=All: nothing is stored)."""
    kind = _KINDS[manifest.get("kind")] if manifest.get("kind") in _KINDS else None
    if kind is None:
        raise ValueError(f"not a kind of ours: {manifest.get('kind')!r}")
    path = (f"/apis/{GROUP}/{VERSION}/{kind.PLURAL}" if kind.SCOPE == "Cluster"
            else f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{kind.PLURAL}")
    # Raw call (not CustomObjectsApi): the body goes out byte for byte as JSON, big integers included.
    resp = api_client.rest_client.pool_manager.request(
        "POST", api_client.configuration.host + path + "?dryRun=All&fieldValidation=Strict",
        body=json.dumps(manifest).encode(), headers={**_auth_headers(api_client), "Content-Type": "application/json",
                                                    "Accept": "application/json"},
        timeout=30)
    body = json.loads(resp.data or b"{}")
    if resp.status in (200, 201):
        return Verdict(True, obj=body)
    if resp.status in (400, 422):
        fields, messages = _fields_of_status(body)
        return Verdict(False, frozenset(fields), tuple(messages))
    raise RuntimeError(f"unexpected answer {resp.status} from the API server: {resp.data[:2000]!r}")


def _auth_headers(api_client) -> dict:
    headers: dict[str, str] = {}
    api_client.update_params_for_auth(headers, [], ["BearerToken"], None, None, None)
    return headers


def error_field(error: str) -> str:
    """The field path an error of api/validation.py names (its messages start with it)."""
    return _normalize(error.split(": ", 1)[0])


def our_verdict(manifest: dict) -> Verdict:
    try:
        obj = validate_manifest(manifest)
    except ManifestError as exc:
        return Verdict(False, frozenset(_normalize(f) for f in exc.fields), tuple(exc.errors))
    return Verdict(True, obj=obj)


def server_verdicts(api_client, manifests: Iterable[dict], namespace: str, workers: int = 8) -> list[Verdict]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda m: server_verdict(api_client, m, namespace), manifests))


def disagreement(manifest: dict, ours: Verdict, theirs: Verdict) -> Optional[str]:
    """Why the two verdicts differ (None when they agree): accept/reject, or the fields named."""
    if ours.accepted != theirs.accepted:
        return f"ours {ours.short()} / server {theirs.short()}"
    if not ours.accepted and ours.fields != theirs.fields:
        return f"fields differ: ours {ours.short()} / server {theirs.short()}"
    return None


def comparable(value: Any) -> Any:
    """Numbers as floats: the server writes 6.5e16 back as 65000000000000000 (same number, other spelling)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def manifest_summary(manifest: Any) -> str:
    return json.dumps(manifest, sort_keys=True, default=str)[:1500]


def server_update_verdict(api_client, manifest: dict, namespace: str) -> Verdict:
    """The server's verdict on replacing the stored object by `manifest` (PUT, dryRun=All)."""
    kind = _KINDS[manifest["kind"]]
    name = manifest["metadata"]["name"]
    base = (f"/apis/{GROUP}/{VERSION}/{kind.PLURAL}" if kind.SCOPE == "Cluster"
            else f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{kind.PLURAL}")
    resp = api_client.rest_client.pool_manager.request(
        "PUT", f"{api_client.configuration.host}{base}/{name}?dryRun=All&fieldValidation=Strict",
        body=json.dumps(manifest).encode(), headers={**_auth_headers(api_client), "Content-Type": "application/json",
                                                    "Accept": "application/json"},
        timeout=30)
    body = json.loads(resp.data or b"{}")
    if resp.status == 200:
        return Verdict(True, obj=body)
    if resp.status in (400, 422):
        fields, messages = _fields_of_status(body)
        return Verdict(False, frozenset(fields), tuple(messages))
    raise RuntimeError(f"unexpected answer {resp.status} from the API server: {resp.data[:2000]!r}")


def our_update_verdict(manifest: dict, old: dict) -> Verdict:
    try:
        obj = validate_manifest(manifest, old=old)
    except ManifestError as exc:
        return Verdict(False, frozenset(_normalize(f) for f in exc.fields), tuple(exc.errors))
    return Verdict(True, obj=obj)
