"""The configs the operator renders for the trainer package's commands.

They are built from a FineTuneJob / Dataset spec (so their schema *is* the API's) plus
what the operator resolved: the validated data location, digests, the job's identity.
Credentials are never part of a config: they come from the environment.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from .continual import ReplayData, ResolvedParent
from .curation import MAX_EVAL_SETS, MAX_EVAL_SETS_USED
from .distributed import DistributedSettings
from .dataset import DataFormat, DatasetSpec, PIIPolicy, Provenance
from .finetunejob import BaseModelRef, LoraSettings, Method, Quantization, TrainingSettings
from .governance import GovernanceSpec
from .multimodal import Multimodal
from .meta import ApiModel, URI_PATTERN


class JobIdentity(ApiModel):
    """Which Kubernetes object a run belongs to (labels of metrics and logs)."""

    namespace: str = Field("default", description="Namespace of the object.")
    name: str = Field(..., description="Name of the object.")
    uid: Optional[str] = Field(None, description="UID of the object.")


class TrainingData(ApiModel):
    """The validated data a run trains on (written by the validation command)."""

    uri: str = Field(..., pattern=URI_PATTERN, description="Folder with train.jsonl and eval.jsonl.")
    format: DataFormat = Field(..., description="Format of the examples.")
    digest: Optional[str] = Field(None, description="Digest of the validated data, recorded in the adapter manifest.")


class GovernanceInputs(ApiModel):
    """What the governance command needs besides the training config (filled by the operator)."""

    adapterURI: Optional[str] = Field(
        None, pattern=URI_PATTERN, description="The adapter to check; defaults to the one in {outputURI}/result.json.")
    dataset: DatasetSpec = Field(..., description="The Dataset spec (provenance, source, curation) as it is now.")
    datasetPIIFindings: dict[str, int] = Field(default_factory=dict, description="PII findings of the validation.")
    baseModelDigest: Optional[str] = Field(None, description="Digest of the base model the adapter was trained on.")
    run: int = Field(1, ge=1, description="The governance run's number (a policy change starts a new run).")
    datasetEvalSetURIs: list[str] = Field(
        default_factory=list, max_length=MAX_EVAL_SETS_USED,
        description="The evaluation files the validation decontaminated against (the Dataset's status): the "
        "provenance check re-validates with the same ones.")
    reportURI: Optional[str] = Field(
        None, pattern=URI_PATTERN, description="Where this run's report goes (besides {adapterURI}/governance.json).")


class TrainerConfig(ApiModel):
    """Input of `finetune-trainer train` (and `finetune-trainer governance`)."""

    job: JobIdentity
    baseModel: BaseModelRef
    data: TrainingData
    method: Method = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantization: Optional[Quantization] = None
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    multimodal: Optional[Multimodal] = Field(None, description="spec.multimodal (a vision-language base model).")
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    outputURI: str = Field(..., pattern=URI_PATTERN, description="Run folder: checkpoints/, adapters/, progress.json.")
    initFrom: Optional[ResolvedParent] = Field(None, description="The parent adapter spec.initFrom resolved to.")
    replayData: list[ReplayData] = Field(default_factory=list, description="The training.replay Datasets' data.")
    governance: Optional[GovernanceSpec] = Field(None, description="Effective governance policy (governance command).")
    governanceInputs: Optional[GovernanceInputs] = Field(None, description="Inputs of the governance command.")
    metricsPort: int = Field(9400, ge=0, le=65535, description="Prometheus port; 0 disables the endpoint.")
    progressIntervalSeconds: float = Field(15.0, gt=0, le=30, description="How often progress.json is written.")


class ValidationConfig(ApiModel):
    """Input of `finetune-trainer validate`: check, curate and digest a Dataset."""

    job: JobIdentity
    dataset: DatasetSpec
    outputURI: str = Field(..., pattern=URI_PATTERN, description="Folder for train.jsonl, eval.jsonl, report.json.")
    tokenizerURI: Optional[str] = Field(
        None, pattern=URI_PATTERN, description="Optional tokenizer folder for exact token counts.")
    policyEvalSetURIs: list[str] = Field(
        default_factory=list, max_length=MAX_EVAL_SETS,
        description="evalSetURI of the GovernancePolicies that apply to the namespace (resolved by the operator): "
        "training examples are decontaminated against them when curation.decontamination is set.")
