"""Continual fine-tuning decisions: which adapter spec.initFrom names, which data training.replay
mixes in, and the lineage a chain of adapters records.

Pure functions on the typed API models and on records the handlers read (a parent FineTuneJob,
an alias record, a parent's manifest): no I/O here, so every rule is tested without a cluster.

    spec.initFrom ──resolve_init_from──► (uri, digest)  ──handlers verify the manifest──►
        continual_plan ──► trainer config (initFrom, replayData) + status.lineage
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .api.continual import MAX_LINEAGE_DEPTH, InitFrom, ReplayData, ResolvedParent
from .api.dataset import Dataset
from .api.finetunejob import FineTuneJob, FineTuneJobSpec
from .conditions import bounded

#: Reasons (conditions and Events) of a job whose spec.initFrom cannot be used.
INIT_FROM_INVALID = "InitFromInvalid"
WAITING_FOR_PARENT = "WaitingForParent"


@dataclass(frozen=True)
class Resolution:
    """What spec.initFrom names right now: Resolved (parent set), Waiting (not promoted yet) or Invalid."""

    state: str
    message: str = ""
    parent: Optional[ResolvedParent] = None


def alias_location(spec: FineTuneJobSpec) -> Optional[str]:
    """Where the alias record spec.initFrom.alias names is (None: initFrom names no alias)."""
    init = spec.initFrom
    if init is None or init.alias is None:
        return None
    from .governance import alias_uri

    if init.alias.store or init.alias.outputURI:
        return alias_uri(init.alias.outputURI or "", init.alias.name, init.alias.store)
    return alias_uri(spec.output.uri, init.alias.name, spec.promotion.aliasStore)


def _source(init: InitFrom) -> str:
    if init.fineTuneJob is not None:
        return f"fineTuneJob/{init.fineTuneJob.name}"
    if init.alias is not None:
        return f"alias/{init.alias.name}"
    return "adapter"


def resolve_init_from(spec: FineTuneJobSpec, parent_job: Optional[FineTuneJob] = None,
                      alias_record: Optional[dict] = None) -> Resolution:
    """The parent adapter (uri, digest) of spec.initFrom, from the parent FineTuneJob's status
    (its promoted adapter) or the alias record; an adapter URI names its digest itself."""
    init = spec.initFrom
    if init is None:
        return Resolution("Invalid", "spec.initFrom is not set")
    source = _source(init)

    def resolved(uri: Any, digest: Any) -> Resolution:
        parent = ResolvedParent.model_validate({"uri": uri, "digest": digest, "source": source, "l2": init.l2})
        return Resolution("Resolved", f"spec.initFrom ({source}) is adapter {parent.digest}", parent)

    if init.adapter is not None:
        return resolved(init.adapter.uri, init.adapter.digest)
    if init.fineTuneJob is not None:
        name = init.fineTuneJob.name
        if parent_job is None:
            return Resolution("Waiting", f"spec.initFrom.fineTuneJob: FineTuneJob {name} does not exist (yet)")
        status = parent_job.status
        if status is None or status.promotion is None or status.promotion.state != "Promoted" or status.adapter is None:
            phase = status.phase if status else "Pending"
            return Resolution("Waiting", f"spec.initFrom.fineTuneJob: FineTuneJob {name} has no promoted adapter "
                                         f"yet (phase {phase})")
        try:
            return resolved(status.adapter.uri, status.adapter.digest)
        except ValueError:
            return Resolution("Invalid", f"spec.initFrom.fineTuneJob: FineTuneJob {name}'s status.adapter is not an "
                                         "adapter URI and digest")
    # An alias record is read from the bucket: its content is not trusted to be well-formed.
    where = alias_location(spec)
    if alias_record is None:
        return Resolution("Waiting", f"spec.initFrom.alias: no alias record at {where} (yet)")
    if not isinstance(alias_record, dict):
        return Resolution("Invalid", f"spec.initFrom.alias: {where} is not an alias record")
    try:
        return resolved(alias_record.get("adapterURI"), alias_record.get("adapterDigest"))
    except ValueError:
        return Resolution("Invalid", f"spec.initFrom.alias: {where} has no valid adapterURI and adapterDigest")


def manifest_digest(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def chain_of(parent_uri: str, parent_digest: str, parent_manifest: dict) -> list[dict]:
    """The lineage chain of a child of this parent: the parent first, then the parent's own chain
    (what its manifest recorded), down to the adapter trained from the base model.

    ValueError (naming spec.initFrom) when the parent's manifest is not one the trainer wrote, or the
    chain would be deeper than MAX_LINEAGE_DEPTH."""
    if not isinstance(parent_manifest, dict):
        raise ValueError("spec.initFrom: the parent's manifest.json is not an object")
    dataset = parent_manifest.get("dataset") if isinstance(parent_manifest.get("dataset"), dict) else {}
    entry = {"digest": parent_digest, "uri": parent_uri,
             "datasetDigest": dataset.get("digest"), "datasetURI": dataset.get("uri"),
             "datasetFormat": dataset.get("format")}
    below = (parent_manifest.get("lineage") or {}).get("chain") if isinstance(parent_manifest.get("lineage"), dict) \
        else None
    if below is None:
        below = []
    if not isinstance(below, list) or not all(isinstance(e, dict) and _DIGEST.match(str(e.get("digest")))
                                              for e in below):
        raise ValueError("spec.initFrom: the parent's manifest has a malformed lineage.chain")
    # Read from a bucket: only the known keys, strings of bounded length, digests that are digests.
    chain = [_clean(entry)] + [_clean(e) for e in below]
    if len(chain) > MAX_LINEAGE_DEPTH:
        raise ValueError(f"spec.initFrom: the parent's chain has {len(chain) - 1} ancestors; at most "
                         f"{MAX_LINEAGE_DEPTH - 1} are supported")
    return chain


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _clean(entry: dict) -> dict:
    out = {}
    for key in ("digest", "uri", "datasetDigest", "datasetURI", "datasetFormat"):
        value = entry.get(key)
        if value is None or (key == "datasetDigest" and not _DIGEST.match(str(value))):
            continue
        out[key] = str(value)[:2048 if key.endswith(("uri", "URI")) else 80]
    return out


def status_lineage(parent: ResolvedParent, chain: list[dict]) -> dict:
    """status.lineage of a child, from its resolved parent and chain_of's chain."""
    return {"parentDigest": parent.digest, "parentURI": parent.uri, "source": parent.source, "depth": len(chain),
            "chain": [{k: v for k, v in e.items() if k != "datasetFormat"} for e in chain]}


def parent_from_status(ftj: FineTuneJob) -> Optional[ResolvedParent]:
    """The parent recorded in status.lineage (fixed once resolved: a moved alias changes nothing)."""
    lineage = ftj.status.lineage if ftj.status else None
    if ftj.spec.initFrom is None or lineage is None:
        return None
    return ResolvedParent(uri=lineage.parentURI, digest=lineage.parentDigest, source=lineage.source,
                          l2=ftj.spec.initFrom.l2)


def replay_data(spec: FineTuneJobSpec, datasets: dict[str, Optional[Dataset]]) -> tuple[list[ReplayData], str]:
    """The replay Datasets' validated data, or ([], why we wait) while one is missing or not Ready."""
    replay = spec.training.replay
    if replay is None:
        return [], ""
    out = []
    for name in replay.datasets:
        ds = datasets.get(name)
        status = ds.status if ds is not None else None
        if ds is None:
            return [], f"training.replay: Dataset {name} does not exist"
        generation = getattr(ds.metadata, "generation", None) or 1
        if status is None or status.phase != "Ready" or status.observedGeneration != generation \
                or not status.validatedURI:
            return [], f"training.replay: Dataset {name} is {status.phase if status else 'Pending'}"
        out.append(ReplayData(name=name, uri=status.validatedURI, format=ds.spec.format, digest=status.digest))
    return out, ""


@dataclass
class ContinualInputs:
    """What a reconcile of a continual job observed (filled by the handlers)."""

    resolution: Optional[Resolution] = None
    manifest: Optional[dict] = None  # the parent's manifest.json, parsed
    manifest_digest: Optional[str] = None  # sha256 of the bytes read
    verified: Optional[tuple[bool, str]] = None  # adapter.verify(parent URI)
    replay_datasets: dict[str, Optional[Dataset]] = field(default_factory=dict)


@dataclass(frozen=True)
class ContinualPlan:
    """Ready: trainer_fields go into the trainer config and lineage into status; otherwise wait or fail."""

    state: str  # Ready | Waiting | Invalid
    message: str = ""
    reason: str = ""
    trainer_fields: dict = field(default_factory=dict)
    lineage: Optional[dict] = None


def continual_plan(ftj: FineTuneJob, inputs: ContinualInputs) -> ContinualPlan:
    """Whether a job with spec.initFrom / training.replay can start its trainer, and with what."""
    spec = ftj.spec
    fields: dict[str, Any] = {}
    lineage = ftj.status.lineage.model_dump(mode="json", exclude_none=True) if ftj.status and ftj.status.lineage else None
    # Replay first: while a replay Dataset is not Ready the parent is not read (handlers skip it too).
    replay, why = replay_data(spec, inputs.replay_datasets)
    if why:
        return ContinualPlan("Waiting", why, "WaitingForDataset")
    if replay:
        fields["replayData"] = [r.model_dump(mode="json", exclude_none=True) for r in replay]
    if spec.initFrom is not None:
        parent = parent_from_status(ftj)
        if parent is None:  # not resolved yet: resolve and check the parent now
            res = inputs.resolution or Resolution("Waiting", "spec.initFrom: not resolved yet")
            if res.state != "Resolved":
                return ContinualPlan(res.state, bounded(res.message),
                                     WAITING_FOR_PARENT if res.state == "Waiting" else INIT_FROM_INVALID)
            parent = res.parent
            problem = _parent_problem(parent, inputs)
            if problem:
                return ContinualPlan("Invalid", bounded(problem), INIT_FROM_INVALID)
            try:
                chain = chain_of(parent.uri, parent.digest, inputs.manifest or {})
            except ValueError as exc:
                return ContinualPlan("Invalid", bounded(exc), INIT_FROM_INVALID)
            lineage = status_lineage(parent, chain)
        fields["initFrom"] = parent.model_dump(mode="json")
    return ContinualPlan("Ready", trainer_fields=fields, lineage=lineage)


def _parent_problem(parent: ResolvedParent, inputs: ContinualInputs) -> str:
    """Why the parent adapter cannot be continued ('' when it can): its files against its manifest,
    its manifest against the digest spec.initFrom resolved to."""
    where = f"spec.initFrom ({parent.source})"
    if inputs.verified is None:
        return f"{where}: adapter {parent.uri} could not be read"
    if inputs.manifest_digest is not None and inputs.manifest_digest != parent.digest:
        return (f"{where}: adapter {parent.uri} has digest {inputs.manifest_digest}, not {parent.digest}: "
                "it changed after it was named; refusing to train from it")
    ok, message = inputs.verified
    if not ok:
        return f"{where}: adapter does not verify: {message}"
    return ""


def typed_job(ftj: Optional[dict]) -> Optional[FineTuneJob]:
    """The typed FineTuneJob of a body, with only the status fields continual decisions read
    (phase, adapter, promotion, lineage): a status field this version does not know never stops it."""
    if ftj is None:
        return None
    status = {k: v for k, v in (ftj.get("status") or {}).items() if k in ("phase", "adapter", "promotion", "lineage")}
    meta = {k: v for k, v in (ftj.get("metadata") or {}).items() if k in ("name", "namespace", "generation", "uid")}
    try:
        return FineTuneJob.model_validate({"kind": "FineTuneJob", "metadata": meta, "spec": ftj.get("spec") or {}, "status": status or None})
    except ValueError:
        return None


def typed_dataset(ds: Optional[dict]) -> Optional[Dataset]:
    """The typed Dataset of a body, with the status fields replay reads."""
    if ds is None:
        return None
    keep = ("phase", "observedGeneration", "validatedURI", "digest")
    status = {k: v for k, v in (ds.get("status") or {}).items() if k in keep}
    meta = {k: v for k, v in (ds.get("metadata") or {}).items() if k in ("name", "namespace", "generation", "uid")}
    try:
        return Dataset.model_validate({"kind": "Dataset", "metadata": meta, "spec": ds.get("spec") or {}, "status": status or None})
    except ValueError:
        return None
