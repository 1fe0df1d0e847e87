"""FineTuneJob: train an adapter on a Dataset, check it, promote it."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import Field

from .continual import EXACTLY_ONE_PARENT, InitFrom, LineageStatus, ReplaySettings, ReplayStats
from .balance import BalanceReport, BalanceSettings
from .distributed import DistributedSettings, MemoryPlanStatus
from .governance import CheckResult, GovernanceSpec
from .meta import (DIGEST_PATTERN, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, ApiModel, Condition, Resource, SecretRef,
                   URI_PATTERN, age_column)
from .multimodal import Multimodal
from .scheduling import Affinity, Toleration, label_map_field
from .serving import PromotionTarget, ServedAdapter, TargetStatus

Method = Literal["lora", "qlora", "dora"]
Precision = Literal["bf16", "fp16", "fp32"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
PromotionMode = Literal["auto", "manual"]
JobPhase = Literal["Pending", "WaitingForDataset", "Queued", "Training", "Evaluating",
                   "AwaitingApproval", "Succeeded", "Failed", "Suspended"]
PromotionState = Literal["Pending", "AwaitingApproval", "Promoted", "Blocked", "RolledBack"]


def _immutable(field: str) -> dict:
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": f"{field} is immutable"}]}


def _rules(*rules: dict) -> dict:
    return {"json_schema_extra": {"x-kubernetes-validations": list(rules)}}


class BaseModelRef(ApiModel):
    """The base model: a Hugging Face-format folder (config.json, tokenizer, safetensors)."""

    uri: str = Field(..., pattern=URI_PATTERN, max_length=2048,
                     description="Folder with the model in Hugging Face format, at s3://… or file://….")
    digest: Optional[str] = Field(
        None, pattern=DIGEST_PATTERN,
        description="Expected sha256 of the model folder (sha256 over the sorted file list with each "
        "file's sha256). A mismatch stops the run with a configuration error.")
    credentials: Optional[SecretRef] = Field(None, description="Secret with S3 credentials for the model.")


class DatasetRef(ApiModel):
    """A Dataset in the same namespace."""

    # A Dataset's name is a DNS-1123 subdomain of at most 63 characters: a reference to anything else
    # could never resolve.
    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
                      description="Name of a Dataset in the FineTuneJob's namespace.")


class LoraSettings(ApiModel):
    """LoRA adapter shape (peft LoraConfig)."""

    model_config = ApiModel.model_config | _rules({
        "rule": "!has(self.layersToTransform) || !has(self.targetModules) || self.targetModules != ['all-linear']",
        "message": "lora.layersToTransform needs module names in lora.targetModules (e.g. q_proj, v_proj), not all-linear",
        "fieldPath": ".layersToTransform", "reason": "FieldValueInvalid",
    })

    r: int = Field(16, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1).")
    targetModules: list[str] = Field(
        default_factory=lambda: ["all-linear"], min_length=1,
        description="Module names to adapt (e.g. q_proj, v_proj), or [all-linear] for every linear layer "
        "except the output head.")
    layersToTransform: Optional[list[Annotated[int, Field(ge=0, le=1023)]]] = Field(
        None, min_length=1, max_length=1024,
        description="Only these decoder layers (indices from 0) get adapters (peft layers_to_transform); "
        "unset: every layer. Adapting only the top layers lets the trainer run the frozen layers below "
        "once per example instead of in every step.",
        json_schema_extra={"x-kubernetes-list-type": "set"})


class Quantization(ApiModel):
    """4-bit quantization of the frozen base model (bitsandbytes), used by QLoRA."""

    bits: Literal[4] = Field(4, description="Bits per weight of the frozen base model. Only 4 is supported.")
    quantType: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (NormalFloat) or fp4.")
    doubleQuant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    computeDtype: ComputeDtype = Field("bfloat16", description="Dtype of matrix multiplications.")


class TrainingSettings(ApiModel):
    """The optimization loop."""

    model_config = ApiModel.model_config | _rules({
        "rule": "!(has(self.epochs) && has(self.maxSteps))",
        "message": "set either training.epochs or training.maxSteps, not both",
    })

    epochs: Optional[float] = Field(None, gt=0, le=100,
                                    description="Passes over the training data (default 1 when maxSteps is unset).")
    maxSteps: Optional[int] = Field(None, ge=1, description="Optimizer steps to run, instead of epochs.")
    learningRate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate of AdamW.")
    lrScheduler: Scheduler = Field("cosine", description="Learning-rate schedule after warmup.")
    warmupRatio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    weightDecay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    maxGradNorm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    batchSize: int = Field(4, ge=1, le=4096,
                           description="Micro-batch size per device (sequences, or packed rows when packing).")
    gradientAccumulationSteps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    maxSeqLength: int = Field(2048, ge=16, le=131072, description="Tokens per sequence (or packed row).")
    packing: bool = Field(True, description="Pack several examples per row, with attention kept inside each example.")
    gradientCheckpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    precision: Precision = Field("bf16", description="Training precision: bf16, fp16 or fp32.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for initialization, data order and dropout; same seed, same run.")
    evalEverySteps: int = Field(50, ge=1, description="Compute eval loss every N optimizer steps (and at the end).")
    checkpointEverySteps: int = Field(100, ge=1, description="Write a resumable checkpoint every N optimizer steps.")
    keepCheckpoints: int = Field(2, ge=1, le=100, description="How many complete checkpoints to keep.")
    replay: Optional[ReplaySettings] = Field(
        None, description="Mix examples of earlier Datasets into each epoch (continual fine-tuning; docs/continual.md).")
    balance: Optional[BalanceSettings] = Field(
        None, description="Group-balanced sampling: re-sample the training examples so each group contributes "
        "equally or to given weights (docs/datasets.md).")


QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
#: domain/name: a DNS subdomain, then a qualified name's name part (<= 63 characters).
GPU_RESOURCE_PATTERN = (r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


class ResourceSettings(ApiModel):
    """Where and on what the trainer runs."""

    model_config = ApiModel.model_config | _rules({
        # The API server also checks the schema's `default: {}` against this rule, before any nested
        # default applies: every field the rule reads may be absent, and absent means its default.
        "rule": "!has(self.nodes) || self.nodes == 1 || !has(self.gpusPerNode) || self.gpusPerNode > 0",
        "message": "resources.nodes > 1 requires resources.gpusPerNode >= 1",
    })

    gpusPerNode: int = Field(1, ge=0, le=16, description="GPUs per trainer pod; 0 runs on CPU (tests, tiny models).")
    nodes: int = Field(1, ge=1, le=64, description="Trainer pods (nodes).")
    gpuResourceName: str = Field(
        "nvidia.com/gpu", description="Extended resource name of the GPU: domain/name (e.g. nvidia.com/gpu, "
        "amd.com/gpu), outside the kubernetes.io domain.",
        pattern=GPU_RESOURCE_PATTERN, max_length=253,
        json_schema_extra={"x-kubernetes-validations": [{
            # The API server's IsExtendedResourceName: not a native (kubernetes.io/) resource, and
            # "requests.<name>" must be a qualified name (so the domain is at most 244 characters).
            "rule": "!self.contains('kubernetes.io/') && self.matches('^[^/]{1,244}/')",
            "message": "must be an extended resource name outside the kubernetes.io domain "
                       "(domain of at most 244 characters)"}]})
    gpuNodeSelector: dict[str, str] = label_map_field("Node labels the trainer pod requires (label keys and values).")
    tolerations: Optional[list[Toleration]] = Field(
        None, max_length=32,
        description="Tolerations; defaults to tolerating the usual nvidia.com/gpu taint when GPUs are requested.")
    affinity: Optional[Affinity] = Field(None, description="Pod affinity of the trainer pod (core/v1 Affinity: "
                                         "nodeAffinity, podAffinity, podAntiAffinity).")
    priorityClassName: Optional[str] = Field(None, description="PriorityClass of the trainer pod (a DNS-1123 subdomain).",
                                             pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    cpu: Optional[str] = Field(None, pattern=QUANTITY_PATTERN, description="CPU request and limit (e.g. 8, 500m).")
    memory: Optional[str] = Field(None, pattern=QUANTITY_PATTERN, description="Memory request and limit (e.g. 64Gi).")
    queueName: Optional[str] = Field(
        None, pattern=DNS_LABEL_PATTERN, max_length=63,
        description="Kueue LocalQueue: sets kueue.x-k8s.io/queue-name so Kueue's quota and fair sharing apply.")


class OutputLocation(ApiModel):
    """Where adapters, checkpoints, progress and reports are written."""

    uri: str = Field(..., pattern=URI_PATTERN, max_length=2048,
                     description="Folder (s3://… or file://…) for adapters and checkpoints.")
    credentials: Optional[SecretRef] = Field(None, description="Secret with S3 credentials for the output.")
    checkpointsOnDelete: Literal["Delete", "Retain"] = Field(
        "Delete", description="What deleting the FineTuneJob does with its checkpoints; adapters are never deleted.")


class Approval(ApiModel):
    """A recorded approval for manual promotion."""

    digest: str = Field(..., pattern=DIGEST_PATTERN,
                        description="The adapter digest being approved; an approval of another digest is ignored.")
    approvedBy: Optional[str] = Field(None, max_length=256, description="Who approved (as the approver states it).")


class PromotionSettings(ApiModel):
    """How a passing adapter is promoted."""

    mode: PromotionMode = Field("auto", description="auto: promote when every required check passes; "
                                "manual: also wait for an approval naming the adapter digest.")
    alias: Optional[str] = Field(None, pattern=DNS_LABEL_PATTERN, max_length=63,
                                 description="Alias to point at the adapter (defaults to the job name).")
    approval: Optional[Approval] = Field(None, description="Approval for manual promotion.")
    aliasStore: Optional[str] = Field(
        None, pattern=URI_PATTERN, max_length=2048,
        description="Folder of the alias record (<aliasStore>/<alias>.json; default: <output>/aliases). Jobs that "
                    "succeed one another (each with its own output folder) name the same store, so a promotion "
                    "keeps the earlier adapter in the alias history and a rollback can go back to it.")
    targets: list[PromotionTarget] = Field(
        default_factory=list, max_length=8,
        description="Where the promoted adapter is published (vLLM, KServe, an OCI registry). Each target mirrors "
                    "the alias: it serves the alias's adapter after a promotion and what the alias went back to "
                    "after a rollback. A failing target is retried with backoff and never un-promotes the alias.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    revoked: bool = Field(False, description="Roll back: take this adapter out of service. The alias goes back to "
                                             "the adapter it pointed at before (its history), and every target "
                                             "follows. `ftctl rollback ALIAS` sets it.")


class FineTuneJobSpec(ApiModel):
    """The desired FineTuneJob."""

    model_config = ApiModel.model_config | _rules(
        {"rule": "self.method != 'qlora' || has(self.quantization)",
         "message": "spec.quantization (4-bit) is required when spec.method is qlora",
         "fieldPath": ".quantization", "reason": "FieldValueRequired"},
        {"rule": "!has(self.quantization) || self.method != 'lora'",
         "message": "spec.quantization needs spec.method qlora (or dora for QDoRA); plain lora trains a full-precision base",
         "fieldPath": ".quantization", "reason": "FieldValueInvalid"},
    )

    baseModel: BaseModelRef = Field(..., description="The base model.", json_schema_extra=_immutable("spec.baseModel"))
    datasetRef: DatasetRef = Field(..., description="The Dataset to train on.", json_schema_extra=_immutable("spec.datasetRef"))
    method: Method = Field("lora", description="lora, qlora (LoRA on a 4-bit base) or dora (weight-decomposed LoRA; "
                           "with quantization it is QDoRA).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape.")
    quantization: Optional[Quantization] = Field(None, description="4-bit base-model quantization (QLoRA / QDoRA).")
    initFrom: Optional[InitFrom] = Field(
        None, description="Continue training an earlier adapter instead of starting from the base model "
        "(docs/continual.md); the retention check then becomes required.",
        json_schema_extra={"x-kubernetes-validations": [*_immutable("spec.initFrom")["x-kubernetes-validations"],
                                                         EXACTLY_ONE_PARENT]})
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="The optimization loop.")
    multimodal: Optional[Multimodal] = Field(
        None, description="A vision-language base model (Dataset format image-text): what trains besides the LoRA "
        "on the language model, and at what learning rate (docs/multimodal.md). Unset: vision encoder frozen, "
        "projector trained.")
    resources: ResourceSettings = Field(default_factory=ResourceSettings, description="Scheduling and hardware.")
    distributed: DistributedSettings = Field(default_factory=DistributedSettings,
                                             description="How the trainer's ranks share the work (docs/distributed.md).")
    output: OutputLocation = Field(..., description="Where adapters and checkpoints go.")
    governance: Optional[GovernanceSpec] = Field(
        None, description="Checks and thresholds; may only tighten the GovernancePolicy that applies.")
    promotion: PromotionSettings = Field(default_factory=PromotionSettings, description="Promotion of the adapter.")
    suspend: bool = Field(False, description="Stop the trainer after a checkpoint; set back to false to resume from it.")
    image: Optional[str] = Field(None, min_length=1, max_length=1024, pattern=r"^\S+$",
                                 description="Trainer image, overriding the operator's default (no whitespace).")
    backoffLimit: int = Field(3, ge=0, le=20, description="Retries of the trainer Job for transient failures.")
    activeDeadlineSeconds: Optional[int] = Field(None, ge=60, description="Deadline of the trainer Job.")


class Progress(ApiModel):
    """Training progress, read from the trainer's progress record."""

    step: int = Field(0, ge=0, description="Optimizer steps done.")
    totalSteps: int = Field(0, ge=0, description="Optimizer steps planned.")
    epoch: float = Field(0, ge=0, description="Epochs done (fractional).")
    percent: int = Field(0, ge=0, le=100, description="step / totalSteps in percent.")
    loss: Optional[float] = Field(None, description="Latest training loss.")
    evalLoss: Optional[float] = Field(None, description="Latest eval loss.")
    tokensPerSecond: Optional[float] = Field(None, description="Real (non-padding) training tokens per second.")
    etaSeconds: Optional[int] = Field(None, description="Estimated seconds until training ends.")
    updatedAt: Optional[str] = Field(None, description="When the trainer wrote this record.")


class AdapterRef(ApiModel):
    """The trained adapter."""

    uri: str = Field(..., description="Folder of the adapter (contains its digest; never overwritten).")
    digest: str = Field(..., description="sha256 of the adapter's manifest.json.")
    sizeBytes: int = Field(0, ge=0, description="Total size of the adapter's files.")


class GovernanceRunRecord(ApiModel):
    """An earlier governance run of the same adapter, kept when the policy changed and the checks ran again."""

    run: int = Field(..., ge=1, description="The run's number (1 for the first).")
    policyDigest: Optional[str] = Field(None, description="sha256 of the effective policy that run used.")
    passed: Optional[bool] = Field(None, description="Whether every required check passed (unset: it did not finish).")
    failing: list[str] = Field(default_factory=list, description="The required checks that failed.")
    reportURI: Optional[str] = Field(None, description="That run's report (kept; never overwritten).")
    reportDigest: Optional[str] = Field(None, description="sha256 of that run's signed Statement.")
    evaluatedAt: Optional[str] = Field(None, description="When that run's report was read.")


class GovernanceStatus(ApiModel):
    """Results of the governance checks, bound to the adapter digest and to the effective policy."""

    checks: list[CheckResult] = Field(default_factory=list, description="One entry per check.")
    passed: Optional[bool] = Field(None, description="Whether every required check passed.")
    adapterDigest: Optional[str] = Field(None, description="The adapter digest the results are bound to.")
    reportURI: Optional[str] = Field(
        None, description="This run's signed report (governance/run-N.json next to the adapter): an in-toto "
                          "Statement about the adapter in a DSSE envelope.")
    reportDigest: Optional[str] = Field(None, description="sha256 of this run's signed Statement (the envelope's payload).")
    signingKey: Optional[str] = Field(
        None, description="Id of the platform key that signed this run's report (sha256 of the raw Ed25519 public key).")
    effectivePolicy: Optional[dict[str, Any]] = Field(
        None, description="The policy the checks ran under (policy tightened by the job).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    policyDigest: Optional[str] = Field(
        None, description="sha256 of the effective policy; when the policy that applies changes, the checks run again.")
    runs: int = Field(0, ge=0, description="How many times governance ran for this adapter (this run's number).")
    evaluatedAt: Optional[str] = Field(None, description="When the checks last ran.")
    history: list[GovernanceRunRecord] = Field(
        default_factory=list, max_length=20,
        description="Earlier runs of this adapter under other policies, oldest first (the last 20).")


class PromotionStatus(ApiModel):
    """Promotion of the adapter."""

    state: PromotionState = Field("Pending", description="Pending, AwaitingApproval, Promoted or Blocked.")
    alias: Optional[str] = Field(None, description="The alias that points at the adapter.")
    aliasURI: Optional[str] = Field(None, description="Where the alias record is.")
    promotedAt: Optional[str] = Field(None, description="When the adapter was promoted.")
    modelCardURI: Optional[str] = Field(
        None, description="MODEL_CARD.md beside the promoted adapter (Hugging Face model card conventions): "
                          "base model, data provenance, training, governance results and lineage.")
    approvedBy: Optional[str] = Field(None, description="Who approved a manual promotion (as the approval states it).")
    approvalManager: Optional[str] = Field(
        None, description="The field manager that wrote spec.promotion.approval, as metadata.managedFields shows "
                          "it (e.g. kubectl-edit, argocd-controller); the API does not record user names.")
    approvedAt: Optional[str] = Field(None, description="When that manager wrote the approval (managedFields time).")
    reason: Optional[str] = Field(None, description="Why promotion is blocked or waiting.")
    served: Optional[ServedAdapter] = Field(
        None, description="What the alias points at after this job's last alias write (promotion or rollback): "
                          "what its targets serve.")
    rolledBackAt: Optional[str] = Field(None, description="When spec.promotion.revoked took the adapter out of service.")
    targets: list[TargetStatus] = Field(default_factory=list, max_length=8,
                                        description="One entry per spec.promotion.targets entry.")


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    phase: JobPhase = Field("Pending", description="Pending, WaitingForDataset, Queued, Training, Evaluating, "
                            "AwaitingApproval, Succeeded, Failed or Suspended.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="DatasetReady, ParentReady (spec.initFrom), Trained, GovernancePassed, Promoted, Failed, "
                    "Suspended; and the kstatus "
                    "conditions Ready (True only when promoted), Reconciling (work in progress; reason = the "
                    "phase), Stalled (cannot progress without a change: blocked, invalid data, rejected, failed); "
                    "see docs/gitops.md.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    observedGeneration: int = Field(0, ge=0, description="The generation the status describes.")
    progress: Optional[Progress] = Field(None, description="Training progress.")
    trainerJob: Optional[str] = Field(None, description="Name of the trainer Job.")
    governanceJob: Optional[str] = Field(None, description="Name of the governance Job.")
    datasetDigest: Optional[str] = Field(None, description="Digest of the Dataset the run trained on.")
    balance: Optional[BalanceReport] = Field(None, description="Group counts before and after training.balance.")
    adapter: Optional[AdapterRef] = Field(None, description="The trained adapter.")
    governance: Optional[GovernanceStatus] = Field(None, description="Governance results.")
    promotion: Optional[PromotionStatus] = Field(None, description="Promotion of the adapter.")
    lineage: Optional[LineageStatus] = Field(None, description="The parent adapter (spec.initFrom) and its ancestors.")
    replay: Optional[ReplayStats] = Field(None, description="What training.replay mixed into training.")
    gpuHours: float = Field(0, ge=0, description="GPU-hours used by trainer pods so far.")
    plan: Optional[MemoryPlanStatus] = Field(None, description="Pre-flight memory and time plan (condition Feasible).")
    startTime: Optional[str] = Field(None, description="When training started.")
    completionTime: Optional[str] = Field(None, description="When the job finished.")
    message: str = Field("", description="A human-readable summary of the current phase.")


class FineTuneJob(Resource):
    """Fine-tune a base model on a Dataset with LoRA, QLoRA or DoRA; gate the adapter on governance."""

    KIND: ClassVar[str] = "FineTuneJob"
    PLURAL: ClassVar[str] = "finetunejobs"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ftj",)
    # The operator labels its Jobs with this name (finetune.dev/...: <name>): label values are <= 63.
    NAME_MAX_LENGTH: ClassVar[int] = 63
    PRINTER_COLUMNS: ClassVar[tuple[dict, ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent"},
        {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel.uri"},
        {"name": "Adapter", "type": "string", "jsonPath": ".status.adapter.digest", "priority": 1},
        {"name": "Promotion", "type": "string", "jsonPath": ".status.promotion.state"},
        age_column(),
    )

    kind: Literal["FineTuneJob"] = Field("FineTuneJob", description="FineTuneJob")
    spec: FineTuneJobSpec = Field(..., description="The desired FineTuneJob.")
    status: Optional[FineTuneJobStatus] = Field(None, description="Observed state, written by the operator.")
