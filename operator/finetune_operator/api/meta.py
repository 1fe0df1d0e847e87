"""Shared building blocks: API identity, conditions, references, URIs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: s3://bucket[/key] or file://path. Bucket names follow the S3 naming rules.
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?|file://\S+)$"
DIGEST_PATTERN = r"^sha256:[a-f0-9]{64}$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ApiModel(BaseModel):
    """Base of every API type: unknown fields are errors, names are camelCase as written."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


def uri_field(description: str, **kw: Any) -> Any:
    return Field(..., description=description, pattern=URI_PATTERN, max_length=2048, **kw)


class SecretRef(ApiModel):
    """A Secret in the same namespace holding S3 credentials."""

    name: str = Field(
        ...,
        description="Name of a Secret in the object's namespace with the keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN). The values are passed to Jobs only "
        "through secretKeyRef and never appear in status, events or logs.",
        pattern=DNS_LABEL_PATTERN.replace("([-a-z0-9]*", "([-a-z0-9.]*"),
        max_length=253,
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition shape)."""

    type: str = Field(..., description="Type of the condition, in CamelCase (e.g. Trained, Promoted).")
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="A CamelCase machine-readable reason for the last transition.")
    message: str = Field("", description="A human-readable message about the last transition.")
    lastTransitionTime: str = Field(..., description="When the status last changed (RFC 3339).")
    observedGeneration: int = Field(0, description="The metadata.generation the condition was computed from.", ge=0)


class ObjectMeta(BaseModel):
    """Kubernetes object metadata; validated by the API server, not by this schema."""

    model_config = ConfigDict(extra="allow")


class Resource(ApiModel):
    """A top-level Kubernetes object of this API group."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]]
    SCOPE: ClassVar[str] = "Namespaced"
    PRINTER_COLUMNS: ClassVar[tuple[dict, ...]] = ()

    apiVersion: Literal["finetune.dev/v1alpha1"] = Field(API_VERSION, description="finetune.dev/v1alpha1")
    kind: str = Field(..., description="The kind of the object.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")


def age_column() -> dict:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
