"""Serving targets: where a promoted adapter is published (spec.promotion.targets) and how each went.

A target mirrors the promotion alias: after a promotion it serves the alias's new adapter, after a
rollback the adapter the alias went back to (or nothing). Each kind is one small publisher in
finetune_operator/serving/; these are only the shapes users write and read.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .meta import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, ApiModel, Condition

TargetKind = Literal["vllm", "kserve", "oci"]
TargetState = Literal["Pending", "Published", "Unpublished", "Retrying"]
TARGET_KINDS: tuple[str, ...] = ("vllm", "kserve", "oci")

#: An OCI repository without scheme or tag: registry[:port]/path (lower case, as the distribution spec says).
OCI_REPOSITORY_PATTERN = r"^[a-z0-9.\-]+(:[0-9]+)?(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+$"
OCI_TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"


class VLLMTarget(ApiModel):
    """A vLLM server: a ConfigMap listing `--lora-modules` entries, and optionally its runtime LoRA API."""

    configMap: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                           description="ConfigMap in the job's namespace that the operator keeps (created with the "
                                       "label finetune.dev/serving=vllm; an existing one must carry that label). Keys: "
                                       "lora-modules (name=path words for the command line), lora-modules.json (one "
                                       "JSON object per adapter, as --lora-modules also accepts) and adapters.json "
                                       "(alias -> object-store URI and digest, for the step that syncs the files).")
    mountPath: str = Field("/adapters", pattern=r"^/[A-Za-z0-9_.\-/]*$", max_length=512,
                           description="Where the server sees adapters: each one at <mountPath>/<alias>/<digest "
                                       "prefix> (a new adapter never overwrites files a running server reads).")
    baseModelName: Optional[str] = Field(None, min_length=1, max_length=256, pattern=r"^\S+$",
                                         description="base_model_name of the entries (vLLM's served base model).")
    loadURL: Optional[str] = Field(
        None, max_length=512, pattern=r"^https?://[A-Za-z0-9.\-]+(:[0-9]+)?/?$",
        description="Base URL of a vLLM server started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: the operator "
                    "calls /v1/unload_lora_adapter and /v1/load_lora_adapter there. Only hosts the platform allows "
                    "(a Service in the job's namespace by default) are called.")


class KServeTarget(ApiModel):
    """A KServe LLMInferenceService whose `spec.model.lora.adapters` lists the alias (server-side apply)."""

    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                      description="LLMInferenceService in the job's namespace (it must exist; only its LoRA adapter "
                                  "list is written, with field manager finetune-operator).")
    kind: Literal["LLMInferenceService"] = Field(
        "LLMInferenceService", description="LLMInferenceService (serving.kserve.io/v1alpha1). InferenceService "
                                           "v1beta1 has no adapter field: use a vllm target for its args.")


class OCITarget(ApiModel):
    """An OCI artifact of the adapter (ORAS layout: one layer per file), pushed to a registry."""

    repository: str = Field(..., max_length=255, pattern=OCI_REPOSITORY_PATTERN,
                            description="registry/path, e.g. registry.example.com/team-a/adapters; it must lie under "
                                        "the prefix the platform allows for the job's namespace.")
    tag: Optional[str] = Field(None, pattern=OCI_TAG_PATTERN,
                               description="Tag to push (default: the alias). The digest-named tag "
                                           "sha256-<hex> is always pushed too.")


class PromotionTarget(ApiModel):
    """One place a promoted adapter is published to: exactly one of vllm, kserve, oci."""

    model_config = ApiModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [{
        "rule": "[has(self.vllm), has(self.kserve), has(self.oci)].filter(x, x).size() == 1",
        "message": "a promotion target sets exactly one of vllm, kserve, oci", "reason": "FieldValueInvalid"}]}}

    name: str = Field(..., min_length=1, max_length=40, pattern=DNS_LABEL_PATTERN,
                      description="Names the target in status and Events.")
    vllm: Optional[VLLMTarget] = Field(None, description="A vLLM server's adapter list.")
    kserve: Optional[KServeTarget] = Field(None, description="A KServe LLMInferenceService's adapter list.")
    oci: Optional[OCITarget] = Field(None, description="An OCI artifact in a registry.")

    @property
    def kind(self) -> TargetKind:
        return "vllm" if self.vllm else "kserve" if self.kserve else "oci"


class TargetStatus(ApiModel):
    """How publishing to one target went."""

    name: str = Field(..., description="The target's name.")
    kind: TargetKind = Field(..., description="vllm, kserve or oci.")
    state: TargetState = Field("Pending", description="Pending, Published (serves the alias's adapter), Unpublished "
                                                      "(the alias has no adapter any more) or Retrying.")
    adapterDigest: Optional[str] = Field(None, description="The adapter the target serves now (unset: none).")
    reference: Optional[str] = Field(None, description="What was written: ConfigMap, LLMInferenceService or the "
                                                       "pushed artifact's repository@digest.")
    targetDigest: Optional[str] = Field(None, description="sha256 of the target's spec when it was last written "
                                                          "(an edited target is published again).")
    attempts: int = Field(0, ge=0, description="Failed attempts since the last success.")
    nextAttemptAt: Optional[str] = Field(None, description="When a failed target is tried again (backoff).")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=4, description="Published: whether the target serves what the alias says.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


class ServedAdapter(ApiModel):
    """What the alias points at after this job's last alias write: what its targets must serve."""

    uri: Optional[str] = Field(None, description="The adapter folder (unset: the alias has no adapter).")
    digest: Optional[str] = Field(None, description="The adapter's digest.")
