"""Continual fine-tuning: start from an earlier adapter (spec.initFrom), replay earlier data
(training.replay), and the lineage a chain of adapters records.

The operator resolves `spec.initFrom` to one adapter (URI + digest) before the trainer starts;
the trainer verifies that adapter against its digest and manifest and continues training it.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from .meta import DIGEST_PATTERN, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, URI_PATTERN, ApiModel

#: How many ancestors a chain may have (each manifest repeats its ancestors' digests and datasets).
MAX_LINEAGE_DEPTH = 32


class FineTuneJobParent(ApiModel):
    """A FineTuneJob in the same namespace: its promoted adapter (status.adapter once status.promotion is Promoted)."""

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
                      description="Name of the FineTuneJob whose promoted adapter this job continues.")


class AliasParent(ApiModel):
    """A promotion alias: the adapter its record (aliases/<name>.json) points at now."""

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN, description="The alias.")
    outputURI: Optional[str] = Field(
        None, pattern=URI_PATTERN, max_length=2048,
        description="The output folder holding aliases/<name>.json (an alias kept beside its job's output).")
    store: Optional[str] = Field(
        None, pattern=URI_PATTERN, max_length=2048,
        description="The alias store holding <name>.json (the spec.promotion.aliasStore of the jobs that promote "
                    "it). Neither set: this job's own spec.promotion.aliasStore, else its spec.output.uri.")


class AdapterParent(ApiModel):
    """An adapter folder named by URI, pinned by its digest."""

    uri: str = Field(..., pattern=URI_PATTERN, max_length=2048,
                     description="The adapter folder (with manifest.json), at s3://… or file://….")
    digest: str = Field(..., pattern=DIGEST_PATTERN,
                        description="sha256 of its manifest.json; any other adapter there stops the job.")


#: On the spec.initFrom field (with its immutability rule: a field's rules replace its model's).
EXACTLY_ONE_PARENT = {
    "rule": "(has(self.fineTuneJob) ? 1 : 0) + (has(self.alias) ? 1 : 0) + (has(self.adapter) ? 1 : 0) == 1",
    "message": "spec.initFrom needs exactly one of fineTuneJob, alias or adapter"}


class InitFrom(ApiModel):
    """The adapter to continue training from: exactly one of fineTuneJob, alias, adapter."""

    fineTuneJob: Optional[FineTuneJobParent] = Field(None, description="Continue the promoted adapter of this FineTuneJob.")
    alias: Optional[AliasParent] = Field(None, description="Continue the adapter a promotion alias points at.")
    adapter: Optional[AdapterParent] = Field(None, description="Continue this adapter (URI and digest).")
    l2: float = Field(
        0.0, ge=0, le=1e6,
        description="Strength of an L2 penalty on the change of the adapter weights from the parent's "
        "(sum of squared differences, added to the loss): pulls the child towards what the parent knew. "
        "0 turns it off. Costs one copy of the adapter weights and one pass over them per step.")


class ReplaySettings(ApiModel):
    """Examples of earlier Datasets mixed into every epoch, against forgetting."""

    datasets: list[Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN)]] = Field(
        ..., min_length=1, max_length=16,
        description="Names of Datasets (same namespace) whose train split is replayed.",
        json_schema_extra={"x-kubernetes-list-type": "set"})
    fraction: float = Field(
        0.2, gt=0, le=0.9,
        description="Share of every epoch's examples drawn from the replay Datasets (0.2: one in five). "
        "Drawn afresh each epoch, deterministically from training.seed.")


class ResolvedParent(ApiModel):
    """The parent adapter as the operator resolved spec.initFrom (trainer and governance input)."""

    uri: str = Field(..., pattern=URI_PATTERN, description="The parent adapter folder.")
    digest: str = Field(..., pattern=DIGEST_PATTERN, description="sha256 of its manifest.json.")
    source: str = Field(..., description="What spec.initFrom named: fineTuneJob/<name>, alias/<name> or adapter.")
    l2: float = Field(0.0, ge=0, description="spec.initFrom.l2.")


class ReplayData(ApiModel):
    """One replay Dataset's validated data (trainer input)."""

    name: str = Field(..., description="The Dataset.")
    uri: str = Field(..., pattern=URI_PATTERN, description="Folder with its train.jsonl.")
    format: str = Field(..., description="Format of its examples.")
    digest: Optional[str] = Field(None, description="Its digest (recorded in the adapter manifest).")


class LineageAncestor(ApiModel):
    """One adapter of the chain below this one."""

    digest: str = Field(..., description="The adapter's digest.")
    uri: Optional[str] = Field(None, description="Its folder.")
    datasetDigest: Optional[str] = Field(None, description="Digest of the Dataset it was trained on.")
    datasetURI: Optional[str] = Field(None, description="Validated data it was trained on.")


class LineageStatus(ApiModel):
    """Where this job's adapter comes from: its parent, and the parent's ancestors down to the base model."""

    parentDigest: str = Field(..., description="Digest of the parent adapter (spec.initFrom resolved).")
    parentURI: str = Field(..., description="Folder of the parent adapter.")
    source: str = Field(..., description="What spec.initFrom named: fineTuneJob/<name>, alias/<name> or adapter.")
    depth: int = Field(1, ge=1, description="Adapters below this one (1: the parent was trained from the base model).")
    chain: list[LineageAncestor] = Field(
        default_factory=list, max_length=MAX_LINEAGE_DEPTH,
        description="The parent first, then its parent, down to the adapter trained from the base model.")


class ReplayStats(ApiModel):
    """What replay mixed into training (from the trainer's result)."""

    fraction: float = Field(..., description="The share of replayed examples actually mixed into each epoch.")
    examplesPerEpoch: int = Field(..., ge=0, description="Replayed examples in each epoch.")
    poolExamples: int = Field(..., ge=0, description="Examples available in the replay Datasets.")
    datasets: list[str] = Field(default_factory=list, description="The replay Datasets.")
