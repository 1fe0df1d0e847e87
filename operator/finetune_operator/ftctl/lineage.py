"""`ftctl lineage NAME_OR_ALIAS`: the chain of adapters behind a FineTuneJob or alias, down to the base model.

The chain is walked in the object store, not in the cluster: each adapter's manifest.json names
its parent (lineage.parent, written by the trainer for spec.initFrom), so a chain survives its
FineTuneJobs. Each manifest read is hashed and compared with the digest its child (or the alias
record, or the job's status) named: a manifest changed since is shown as such and the walk stops.
What the cluster still knows about each adapter -- the FineTuneJob that trained it, its
governance verdict, its promotion time -- is added when a FineTuneJob with that adapter exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

from finetune_operator.api.continual import MAX_LINEAGE_DEPTH

#: A manifest is a few KiB; the store is not trusted to serve one.
MANIFEST_MAX_BYTES = 4 << 20


@dataclass
class Link:
    digest: str
    uri: str
    dataset: dict = field(default_factory=dict)
    replay: list = field(default_factory=list)
    base_model: dict = field(default_factory=dict)
    job: Optional[str] = None
    governance: Optional[str] = None  # passed | failed | None (unknown)
    promoted_at: Optional[str] = None
    problem: Optional[str] = None  # why the walk stops here


def read_manifest(uri: str) -> bytes:
    from finetune_trainer import storage

    return storage.read_bytes_limited(storage.join(uri, "manifest.json"), MANIFEST_MAX_BYTES)


def walk(uri: str, digest: str, jobs: list[dict], read: Callable[[str], bytes] = read_manifest) -> list[Link]:
    """The adapter at (uri, digest) first, then its parent, and so on down to the one trained from the base."""
    by_digest = {((j.get("status") or {}).get("adapter") or {}).get("digest"): j for j in jobs}
    links: list[Link] = []
    seen: set[str] = set()
    while uri and digest and len(links) <= MAX_LINEAGE_DEPTH:
        link = Link(digest=digest, uri=uri)
        links.append(link)
        _from_cluster(link, by_digest.get(digest))
        if digest in seen:
            link.problem = "a cycle: this adapter is its own ancestor"
            break
        seen.add(digest)
        try:
            raw = read(uri)
        except FileNotFoundError:
            link.problem = "no manifest.json at this location"
            break
        except ValueError:
            link.problem = f"manifest.json larger than {MANIFEST_MAX_BYTES} bytes"
            break
        actual = "sha256:" + hashlib.sha256(raw).hexdigest()
        if actual != digest:
            link.problem = f"manifest.json has digest {actual}: it changed since it was named"
            break
        try:
            manifest = json.loads(raw)
            assert isinstance(manifest, dict)
        except (ValueError, AssertionError):
            link.problem = "manifest.json is not a JSON object"
            break
        link.dataset = manifest.get("dataset") if isinstance(manifest.get("dataset"), dict) else {}
        link.replay = manifest.get("replay") if isinstance(manifest.get("replay"), list) else []
        link.base_model = manifest.get("baseModel") if isinstance(manifest.get("baseModel"), dict) else {}
        parent = (manifest.get("lineage") or {}).get("parent") if isinstance(manifest.get("lineage"), dict) else None
        if not isinstance(parent, dict):
            break  # trained from the base model: the end of the chain
        uri, digest = str(parent.get("uri") or ""), str(parent.get("digest") or "")
    return links


def _from_cluster(link: Link, job: Optional[dict]) -> None:
    if job is None:
        return
    status = job.get("status") or {}
    link.job = job["metadata"]["name"]
    passed = (status.get("governance") or {}).get("passed")
    link.governance = None if passed is None else ("passed" if passed else "failed")
    promotion = status.get("promotion") or {}
    if promotion.get("state") == "Promoted":
        link.promoted_at = promotion.get("promotedAt")


def _short(value: object, limit: int = 120) -> str:
    """One printable line of a value read from the store (which is not trusted)."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render(links: list[Link]) -> list[str]:
    """Lines of the chain, newest adapter first, then the base model."""
    lines = []
    for depth, link in enumerate(links):
        head = "adapter" if depth == 0 else "parent " if depth == 1 else f"ancestor {depth}"
        lines.append(f"{'  ' * depth}{head} {_short(link.digest, 80)}  {_short(link.uri)}")
        pad = "  " * depth + "  "
        if link.job:
            lines.append(f"{pad}job: {_short(link.job, 63)}  governance: {link.governance or '-'}  "
                         f"promoted: {_short(link.promoted_at or '-', 40)}")
        else:
            lines.append(f"{pad}job: - (no FineTuneJob in this namespace has this adapter)")
        if link.dataset:
            lines.append(f"{pad}dataset: {_short(link.dataset.get('digest') or '-', 80)}  "
                         f"{_short(link.dataset.get('uri') or '-')}")
        for r in link.replay:
            if isinstance(r, dict):
                lines.append(f"{pad}replayed: {_short(r.get('name') or '-', 63)}  {_short(r.get('uri') or '-')}")
        if link.problem:
            lines.append(f"{pad}! {_short(link.problem, 200)}")
    last = links[-1] if links else None
    if last is not None and not last.problem and last.base_model:
        lines.append(f"{'  ' * len(links)}base model {_short(last.base_model.get('digest') or '-', 80)}  "
                     f"{_short(last.base_model.get('uri') or '-')}")
    return lines


def start_of(name: str, job: Optional[dict], jobs: list[dict], read_alias: Callable[[str], dict]) -> tuple[str, str, str]:
    """(uri, digest, what) to start from: the FineTuneJob's adapter, else the alias (through the
    FineTuneJob whose promotion wrote it: status.promotion.aliasURI)."""
    from .errors import FtctlError

    if job is not None:
        adapter = (job.get("status") or {}).get("adapter") or {}
        if not adapter.get("digest"):
            raise FtctlError(f"FineTuneJob {name} has no adapter yet (phase "
                             f"{(job.get('status') or {}).get('phase', 'Pending')})")
        return adapter["uri"], adapter["digest"], f"FineTuneJob {name}"
    writers = [j for j in jobs if ((j.get("status") or {}).get("promotion") or {}).get("alias") == name
               and ((j.get("status") or {}).get("promotion") or {}).get("aliasURI")]
    if not writers:
        raise FtctlError(f"{name}: neither a FineTuneJob nor an alias promoted in this namespace")
    alias_uri = writers[0]["status"]["promotion"]["aliasURI"]
    try:
        record = read_alias(alias_uri)
    except FileNotFoundError:
        raise FtctlError(f"alias {name}: no alias record at {alias_uri}") from None
    if not isinstance(record, dict) or not record.get("adapterURI") or not record.get("adapterDigest"):
        raise FtctlError(f"alias {name}: {alias_uri} is not an alias record")
    return str(record["adapterURI"]), str(record["adapterDigest"]), f"alias {name} ({alias_uri})"
